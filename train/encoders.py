"""The conditioning encoder: a vision-language model through transformers.

Interleaved prompt in (strings and images), last hidden states out. Idefics2 is MUMU's
(section 3); any image-text-to-text model with a processor that takes ``<image>``
placeholders works through the same code. ``bypass_resampler`` swaps Idefics2's
perceiver for its modality projection alone, so every vision patch becomes a token
(MUMU section 3, finding 1: more tokens per image preserve detail).
"""

from __future__ import annotations

import torch
from torch import nn

from mmloom.errors import UserError
from mmloom.models import hf_pretrained


class ProjectionOnly(nn.Module):
    """Idefics2 connector without its perceiver resampler."""

    def __init__(self, connector: nn.Module):
        super().__init__()
        self.modality_projection = connector.modality_projection

    def forward(self, image_hidden_states, attention_mask=None):
        return self.modality_projection(image_hidden_states)


class VLMEncoder(nn.Module):
    def __init__(self, ref: str, bypass_resampler: bool = True, image_size: int | None = None, dtype=None):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = hf_pretrained(AutoProcessor, ref, "vision-language model")
        self.model = hf_pretrained(AutoModelForImageTextToText, ref, "vision-language model", dtype=dtype)
        self.image_token = getattr(self.processor, "image_token", "<image>")
        if hasattr(self.image_token, "content"):
            self.image_token = self.image_token.content
        inner = self.inner
        if bypass_resampler:
            conn = getattr(inner, "connector", None)
            if conn is None or not hasattr(conn, "modality_projection"):
                raise UserError(f"bypass_resampler: {ref} has no Idefics2-style connector with a perceiver to bypass")
            inner.connector = ProjectionOnly(conn)
            vcfg = self.model.config.vision_config
            side = (image_size or vcfg.image_size) // vcfg.patch_size
            self.processor.image_seq_len = side * side  # one token per patch
        if image_size and hasattr(self.processor, "image_processor"):
            ip = self.processor.image_processor
            if hasattr(ip, "do_image_splitting"):
                ip.do_image_splitting = False
            size = getattr(ip, "size", None)  # a dict, or transformers' SizeDict (not a dict: both take `in`)
            if size is not None and "longest_edge" in size:
                shortest = size["shortest_edge"]
                ip.size = {**(size if isinstance(size, dict) else {}), "longest_edge": image_size,
                           "shortest_edge": min(shortest or image_size, image_size)}
        self.hidden_size = self.model.config.get_text_config().hidden_size

    @property
    def inner(self) -> nn.Module:
        return getattr(self.model, "model", self.model)

    def vision_parameters(self):
        for name in ("vision_model", "vision_tower"):
            m = getattr(self.inner, name, None)
            if m is not None:
                return m.parameters()
        return iter(())

    def forward(self, prompts: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts: lists of str / PIL parts -> (hidden [B, L, D], attention mask [B, L])."""
        texts, images = [], []
        for parts in prompts:
            t, ims = "", []
            for p in parts:
                if isinstance(p, str):
                    t += p
                else:
                    t += self.image_token
                    ims.append(p)
            if not t.strip():  # the empty (unconditional) prompt still needs one token
                tok = self.processor.tokenizer
                t = tok.bos_token or tok.eos_token or tok.pad_token
            texts.append(t)
            images.append(ims)
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
        if any(images):
            kwargs["images"] = [ims if ims else None for ims in images] if all(images) else images
        try:
            inputs = self.processor(**kwargs)
        except (ValueError, TypeError):
            inputs = self._per_sample_inputs(texts, images)
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = self.inner(**inputs)
        self.last_input_ids = inputs["input_ids"]  # the token layout, for per-segment attention factors
        return out.last_hidden_state, inputs["attention_mask"]

    def _per_sample_inputs(self, texts, images):
        """Processors that refuse a batch mixing prompts with and without images."""
        batch = [self.processor(text=[t], images=[ims] if ims else None, return_tensors="pt") for t, ims in zip(texts, images)]
        L = max(b["input_ids"].shape[1] for b in batch)
        pad = self.processor.tokenizer.pad_token_id or 0
        ids = torch.full((len(batch), L), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for i, b in enumerate(batch):
            n = b["input_ids"].shape[1]
            ids[i, L - n:] = b["input_ids"][0]  # left padding, as Idefics2 does
            mask[i, L - n:] = b["attention_mask"][0]
        out = {"input_ids": ids, "attention_mask": mask}
        pv = [b.get("pixel_values") for b in batch]
        if any(p is not None for p in pv):
            shape = next(p for p in pv if p is not None).shape[2:]
            n_img = max(p.shape[1] if p is not None else 0 for p in pv)
            pixels = torch.zeros((len(batch), n_img, *shape))
            pmask = torch.zeros((len(batch), n_img, *shape[1:]), dtype=torch.long)
            for i, b in enumerate(batch):
                if b.get("pixel_values") is not None:
                    k = b["pixel_values"].shape[1]
                    pixels[i, :k] = b["pixel_values"][0]
                    if "pixel_attention_mask" in b:
                        pmask[i, :k] = b["pixel_attention_mask"][0]
            out["pixel_values"] = pixels
            if any("pixel_attention_mask" in b for b in batch):
                out["pixel_attention_mask"] = pmask
        return out
