"""open_clip -> transformers CLIP: what a diffusers pipeline directory needs of mmloom's
CLIP (``mmloom export`` of Versatile Diffusion and the Kandinsky prior).

Text tower -> ``CLIPTextModelWithProjection`` and a ``CLIPTokenizer`` made from open_clip's
BPE vocabulary; image tower -> ``CLIPVisionModelWithProjection`` and a
``CLIPImageProcessor`` with open_clip's size, interpolation, mean and std.

open_clip's ViT CLIP keeps OpenAI's layout, the one transformers' own conversion script
(``models/clip/convert_clip_original_pytorch_to_hf.py``) maps: each block's fused
``in_proj`` split into q/k/v, ``c_fc``/``c_proj`` -> ``fc1``/``fc2``, ``ln_1``/``ln_2`` ->
``layer_norm1``/``layer_norm2``, the projections transposed into bias-free Linears. That
script is not importable (it is not shipped in the transformers wheel and imports
OpenAI's ``clip`` package), so the same mapping is written here once, in key form, and
every source tensor must be used and every target filled (a strict load), so a layout
this mapping does not know stops the export instead of writing random weights.

Supported: ``open_clip.CLIP`` (the built-in text transformer: causal mask, argmax/EOT
pooling) with a ``VisionTransformer`` image tower (class-token pooling, no attention
pooler, layer norm before pooling). Anything else (ResNet or timm towers, Hugging Face
text towers, CoCa, SigLIP-style pooling) is a UserError naming the part.

The tokenizer pads with open_clip's pad id 0 (``!``), as the converted OpenCLIP
tokenizers on the Hub do (Stable Diffusion 2's), so that the token states at padded
positions, which Versatile Diffusion's contexts include, equal open_clip's; it reads
special tokens in a prompt as plain text (``split_special_tokens``), as open_clip does,
so a ``!`` in a prompt stays a ``!`` rather than becoming padding.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn

from mmloom.errors import UserError

PAD = "!"  # open_clip pads with token id 0, the byte "!"


def _unsupported(ref: str, part: str, why: str) -> UserError:
    return UserError(f"CLIP {ref}: its {part} cannot be converted to transformers' CLIP ({why}); "
                     "only open_clip ViT CLIP models (OpenAI's layout) convert")


def _act(block: nn.Module, ref: str, part: str) -> str:
    from open_clip.transformer import QuickGELU

    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise _unsupported(ref, part, f"activation {type(act).__name__}")


def _blocks(sd: dict, src: str, dst: str, n: int) -> dict:
    """OpenAI-layout residual blocks -> transformers' CLIPEncoderLayer keys."""
    out = {}
    for i in range(n):
        s, d = f"{src}.resblocks.{i}.", f"{dst}.layers.{i}."
        for x, w in zip("qkv", sd.pop(s + "attn.in_proj_weight").chunk(3)):
            out[d + f"self_attn.{x}_proj.weight"] = w
        for x, b in zip("qkv", sd.pop(s + "attn.in_proj_bias").chunk(3)):
            out[d + f"self_attn.{x}_proj.bias"] = b
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[d + f"{b}.{p}"] = sd.pop(s + f"{a}.{p}")
    return out


def _load(model: nn.Module, sd: dict, left: dict, ref: str, part: str) -> nn.Module:
    leftover = sorted(k for k in left if not k.startswith("logit_"))
    if leftover:
        raise _unsupported(ref, part, f"tensors the mapping does not know: {', '.join(leftover[:4])}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise _unsupported(ref, part, f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


def text_model(clip) -> nn.Module:
    """``clip`` (a :class:`mmloom.clip.ClipEmbedder`)'s text tower as ``CLIPTextModelWithProjection``."""
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    m, ref = clip.model, clip.ref
    if type(m) is not open_clip.CLIP:
        raise _unsupported(ref, "text tower", f"{type(m).__name__} is not open_clip.CLIP with the built-in text transformer")
    if m.text_pool_type != "argmax" or m.attn_mask is None:  # argmax: the EOT token, transformers' first eos_token_id
        raise _unsupported(ref, "text tower", f"pooling {m.text_pool_type!r} or no causal mask")
    if isinstance(m.text_projection, nn.Linear):
        raise _unsupported(ref, "text tower", "a text projection with a bias")
    block = m.transformer.resblocks[0]
    width, layers = m.transformer.width, len(m.transformer.resblocks)
    cfg = CLIPTextConfig(vocab_size=m.vocab_size, hidden_size=width, intermediate_size=block.mlp.c_fc.out_features,
                         num_hidden_layers=layers, num_attention_heads=block.attn.num_heads,
                         max_position_embeddings=m.context_length, hidden_act=_act(block, ref, "text tower"),
                         layer_norm_eps=m.ln_final.eps, projection_dim=m.text_projection.shape[1],
                         bos_token_id=clip.tokenizer.sot_token_id, eos_token_id=clip.tokenizer.eot_token_id, pad_token_id=0)
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("visual.")}
    out = _blocks(sd, "transformer", "text_model.encoder", layers)
    for a, b in (("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
                 ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                 ("ln_final.weight", "text_model.final_layer_norm.weight"), ("ln_final.bias", "text_model.final_layer_norm.bias")):
        out[b] = sd.pop(a)
    out["text_projection.weight"] = sd.pop("text_projection").T.contiguous()
    return _load(CLIPTextModelWithProjection(cfg), out, sd, ref, "text tower")


def vision_model(clip) -> nn.Module:
    """``clip``'s image tower as ``CLIPVisionModelWithProjection``."""
    from open_clip.transformer import VisionTransformer
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    v, ref = clip.model.visual, clip.ref
    if not isinstance(v, VisionTransformer):
        raise _unsupported(ref, "image tower", f"{type(v).__name__} is not a ViT")
    if v.attn_pool is not None or v.pool_type != "tok" or v.final_ln_after_pool or v.proj is None:
        raise _unsupported(ref, "image tower", "attention pooling, a pool type other than the class token, or no projection")
    block = v.transformer.resblocks[0]
    layers = len(v.transformer.resblocks)
    patch = v.conv1.kernel_size[0]
    cfg = CLIPVisionConfig(hidden_size=v.transformer.width, intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=layers,
                           num_attention_heads=block.attn.num_heads, image_size=v.image_size[0], patch_size=patch,
                           hidden_act=_act(block, ref, "image tower"), layer_norm_eps=v.ln_pre.eps, projection_dim=v.proj.shape[1])
    sd = {k.removeprefix("visual."): t for k, t in clip.model.state_dict().items() if k.startswith("visual.")}
    out = _blocks(sd, "transformer", "vision_model.encoder", layers)
    for a, b in (("class_embedding", "embeddings.class_embedding"), ("conv1.weight", "embeddings.patch_embedding.weight"),
                 ("positional_embedding", "embeddings.position_embedding.weight"), ("ln_pre.weight", "pre_layrnorm.weight"),
                 ("ln_pre.bias", "pre_layrnorm.bias"), ("ln_post.weight", "post_layernorm.weight"), ("ln_post.bias", "post_layernorm.bias")):
        out["vision_model." + b] = sd.pop(a)
    out["visual_projection.weight"] = sd.pop("proj").T.contiguous()
    return _load(CLIPVisionModelWithProjection(cfg), out, sd, ref, "image tower")


def tokenizer(clip):
    """open_clip's BPE tokenizer as a ``CLIPTokenizer``: the same vocabulary and merges,
    transformers' names for the two special tokens, open_clip's context length and pad id."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    tok = clip.tokenizer
    if not isinstance(tok, SimpleTokenizer):
        raise _unsupported(clip.ref, "tokenizer", f"{type(tok).__name__} is not open_clip's BPE tokenizer")
    names = {tok.decoder[tok.sot_token_id]: "<|startoftext|>", tok.decoder[tok.eot_token_id]: "<|endoftext|>"}
    vocab = {names.get(k, k): i for k, i in tok.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    with tempfile.TemporaryDirectory() as d:  # CLIPTokenizer.from_pretrained reads vocab.json + merges.txt
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        # split_special_tokens: special tokens in a prompt are plain text, as open_clip reads them; else
        # every "!" of a prompt would be cut out as the pad token
        out = CLIPTokenizer.from_pretrained(d, pad_token=PAD, model_max_length=tok.context_length, split_special_tokens=True)
    return out


def image_processor(clip):
    """open_clip's preprocessing as a ``CLIPImageProcessor`` (resize the shortest side,
    center crop, normalize with open_clip's mean and std)."""
    from transformers import CLIPImageProcessor

    pc = clip.model.visual.preprocess_cfg
    h, w = pc["size"] if isinstance(pc["size"], (tuple, list)) else (pc["size"],) * 2
    if pc.get("resize_mode", "shortest") != "shortest" or h != w:
        raise _unsupported(clip.ref, "image preprocessing", f"resize mode {pc.get('resize_mode')!r}, size {pc['size']}")
    from PIL import Image

    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(pc.get("interpolation", "bicubic"))
    if resample is None:
        raise _unsupported(clip.ref, "image preprocessing", f"interpolation {pc.get('interpolation')!r}")
    return CLIPImageProcessor(size={"shortest_edge": h}, crop_size={"height": h, "width": w}, resample=resample,
                              image_mean=list(pc["mean"]), image_std=list(pc["std"]))


@torch.no_grad()
def save_text(clip, out: str, encoder: str = "text_encoder", tok: str = "tokenizer") -> None:
    """The converted text tower and tokenizer, each in its pipeline subfolder."""
    text_model(clip).save_pretrained(os.path.join(out, encoder), safe_serialization=True)
    tokenizer(clip).save_pretrained(os.path.join(out, tok))


@torch.no_grad()
def save_vision(clip, out: str, encoder: str = "image_encoder", processor: str = "image_processor") -> None:
    """The converted image tower and image processor, each in its pipeline subfolder."""
    vision_model(clip).save_pretrained(os.path.join(out, encoder), safe_serialization=True)
    image_processor(clip).save_pretrained(os.path.join(out, processor))
