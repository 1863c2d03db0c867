"""open_clip image and text embeddings: the one open_clip loader.

Shared by the score stage (`filters/scoring.py` runs each model once per batch; the clip
score, the NSFW MLP head, the aesthetic head and the stored embeddings all read that
pass) and by the trainers (Kandinsky's prior, Versatile Diffusion's encoders), so it sits
below both, beside the model hub (`mmloom/models.py`).
"""

from __future__ import annotations

import functools
import json
import os

import torch

from mmloom.errors import UserError
from mmloom.models import fingerprint, inference_autocast, local_path, missing, package_version


class ClipEmbedder:
    """Loads an open_clip model from ``ARCH/TAG``, ``hf-hub:ORG/REPO`` or a local dir
    (``open_clip_config.json`` + weights, open_clip's own hub format)."""

    def __init__(self, ref: str, device: str = "cpu", precision: str = "fp32", resize_on_device: bool = False):
        """``resize_on_device``: `pixels` runs open_clip's resize and crop where the model
        runs, with Pillow's arithmetic (`mmloom.pil_resample`: the same pixels), when the
        preprocessing is a Resize and a CenterCrop; the score stage asks for it on a GPU."""
        import open_clip

        self.ref, self.device, self.resize_on_device = ref, device, resize_on_device
        p = local_path(ref)
        if p is not None:
            if not (p / "open_clip_config.json").exists():
                raise UserError(f"open_clip model directory {ref} has no open_clip_config.json")
            name, kw = f"local-dir:{p}", {}
        elif ref.startswith("hf-hub:"):
            name, kw = ref, {}
        elif "/" in ref:
            name, tag = ref.split("/", 1)
            kw = {"pretrained": tag}
        else:
            raise UserError(f"open_clip model {ref!r}: expected ARCH/PRETRAINED (e.g. ViT-B-32/openai), hf-hub:ORG/REPO or a local directory")
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, device=device, precision=precision, **kw)
            self.tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, OSError, ValueError) as e:
            raise missing(ref, "open_clip model", e) from None
        self.model.eval()
        self.version = f"open_clip {package_version('open-clip-torch')}, weights {fingerprint(ref)}"
        self.dim = int(self.model.text_projection.shape[-1]) if getattr(self.model, "text_projection", None) is not None else None

    @functools.cached_property
    def _split(self):
        """open_clip's preprocessing cut where the pixels become a tensor: its PIL steps
        (resize, crop, RGB), and the mean and std of its final Normalize; None when the
        pipeline is not of that shape (then `pixels` runs it whole)."""
        from torchvision.transforms import Compose, Normalize, ToTensor

        steps = self.preprocess.transforms if isinstance(self.preprocess, Compose) else []
        cut = [i for i, s in enumerate(steps) if isinstance(s, ToTensor)]
        if len(cut) != 1 or len(steps) != cut[0] + 2 or not isinstance(steps[-1], Normalize):
            return None
        norm = steps[-1]
        mean = torch.as_tensor(norm.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(norm.std, dtype=torch.float32).view(-1, 1, 1)
        return Compose(steps[:cut[0]]), mean, std

    @functools.cached_property
    def _device_steps(self):
        """open_clip's PIL steps as (Resize's size, its filter, CenterCrop's (height, width))
        when they are a Resize and a CenterCrop that `mmloom.pil_resample` reproduces, then
        only conversions to RGB; None otherwise (then `pixels` runs them with Pillow)."""
        from torchvision.transforms import CenterCrop, InterpolationMode, Resize

        if self._split is None:
            return None
        steps = list(self._split[0].transforms)
        kinds = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}
        if len(steps) < 2 or not isinstance(steps[0], Resize) or not isinstance(steps[1], CenterCrop):
            return None
        rs, cc = steps[0], steps[1]
        if rs.interpolation not in kinds or rs.max_size is not None:
            return None
        # open_clip's MaybeConvertMode("RGB") or _convert_to_rgb: nothing to do for RGB images
        if not all(getattr(s, "mode", None) == "RGB" or getattr(s, "__name__", "") == "_convert_to_rgb" for s in steps[2:]):
            return None
        return rs.size, kinds[rs.interpolation], tuple(cc.size)

    def pixels(self, pil_images, upload=None) -> torch.Tensor:
        """The image tower's input batch as pixels (CPU work, no model call): [N, 3, H, W]
        uint8 after open_clip's PIL steps (resize, crop), which `images` turns into floats
        and normalizes where the model runs. The score stage's worker threads make these
        (`filters.base.Batch.clip_inputs`): a quarter of the bytes of the float batch and no
        float kernels in the threads (issue 16: on a GPU the CPU side was the bottleneck).
        Page-locked when the model is on a GPU, so that the copy overlaps with compute. A
        preprocessing pipeline of another shape gives its own float tensors instead.

        With ``resize_on_device`` (and RGB images) the resize and crop run where the model
        runs (`_pixels_on_device`), the same pixels; ``upload`` (optional, no arguments):
        the images already there, as `mmloom.pil_resample.upload` groups them."""
        if self.resize_on_device and self._device_steps is not None and all(im.mode == "RGB" for im in pil_images):
            from mmloom import pil_resample

            return self._pixels_on_device(pil_images, upload() if upload else pil_resample.upload(pil_images, self.device))
        x = torch.stack([self.preprocess(im) for im in pil_images]) if self._split is None else self._pil_pixels(pil_images)
        return x.pin_memory() if self.device.startswith("cuda") else x

    def _pil_pixels(self, pil_images) -> torch.Tensor:
        """open_clip's PIL steps (resize, crop, RGB) of each image, with Pillow: [N, 3, H, W] uint8 on the CPU."""
        import numpy as np

        pil_steps = self._split[0]
        return torch.from_numpy(np.stack([np.asarray(pil_steps(im), dtype=np.uint8) for im in pil_images])).permute(0, 3, 1, 2)

    def _pixels_on_device(self, pil_images, groups) -> torch.Tensor:
        """`pixels` from the images on the model's device (``groups``: one uint8 [n, 3, H, W]
        tensor per size): torchvision's Resize and CenterCrop arithmetic for the sizes,
        Pillow's for the pixels (`mmloom.pil_resample.resize`, only the crop's window
        computed). An image smaller than the crop (CenterCrop pads it) takes Pillow's way."""
        from torchvision.transforms.functional import _compute_resized_output_size

        from mmloom import pil_resample

        size, kind, (ch, cw) = self._device_steps
        out = torch.empty((len(pil_images), 3, ch, cw), dtype=torch.uint8, device=self.device)
        for idx, x in groups:
            h, w = _compute_resized_output_size(list(x.shape[-2:]), [size] if isinstance(size, int) else list(size))
            if ch > h or cw > w:
                r = self._pil_pixels([pil_images[i] for i in idx]).to(self.device)
            else:
                crop = (int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0)), ch, cw)
                r = pil_resample.resize(x, (h, w), kind, crop)
            out[torch.as_tensor(idx, device=self.device)] = r
        return pil_resample.hand_over(out)

    def inputs(self, pil_images) -> torch.Tensor:
        """The image tower's float input batch [N, 3, H, W] on the CPU: open_clip's own
        transform of each image (the same numbers, made from `pixels`)."""
        return self._floats(self.pixels(pil_images))

    def _floats(self, x: torch.Tensor) -> torch.Tensor:
        """`pixels`' uint8 batch as open_clip's transform makes it: ``x / 255``, then
        ``(x - mean) / std``, the operations of torchvision's ToTensor and Normalize
        (bit-identical); float tensors pass as they are."""
        if x.dtype != torch.uint8:
            return x
        _, mean, std = self._split
        x = x.contiguous().float().div(255)
        return x.sub_(mean.to(x.device)).div_(std.to(x.device))

    @torch.no_grad()
    def images(self, pil_images, normalize: bool = True) -> torch.Tensor:
        """[N, D] L2-normalized image embeddings (float32, CPU) of PIL images, or of the
        batch `pixels` or `inputs` made of them; ``normalize=False``: CLIP's raw projected embeddings
        (transformers' ``image_embeds``, the scale Kandinsky's released weights work in)."""
        x = pil_images if torch.is_tensor(pil_images) else self.pixels(pil_images)
        x = self._floats(x.to(self.device, non_blocking=True))
        with inference_autocast(self.device):
            e = self.model.encode_image(x).float()
        return (torch.nn.functional.normalize(e, dim=-1) if normalize else e).cpu()

    @torch.no_grad()
    def text_states(self, texts: list[str], normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token states of the text tower before pooling ([N, L, W]), their mask
        ([N, L], padding False) and the pooled embedding ([N, D]; L2-normalized unless
        ``normalize=False``: transformers' ``text_embeds``): the inputs of a
        Kandinsky-style prior and decoder."""
        from open_clip.transformer import text_global_pool

        m = self.model
        t = self.tokens(texts).to(self.device)
        x = m.token_embedding(t) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        pooled = text_global_pool(x, t, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        pooled = m.text_projection(pooled) if isinstance(m.text_projection, torch.nn.Linear) else pooled @ m.text_projection
        pooled = torch.nn.functional.normalize(pooled.float(), dim=-1) if normalize else pooled.float()
        return x.float().cpu(), (t != 0).cpu(), pooled.cpu()

    def tokens(self, texts: list[str]) -> torch.Tensor:
        """The text tower's input ids for ``texts`` ([N, context length], on the CPU; None
        reads as ""): CPU work that the score stage's worker threads do ahead
        (`filters.base.Batch.clip_tokens`), off the thread that drives the GPU.
        Page-locked when the model is on a GPU."""
        t = self.tokenizer([s or "" for s in texts])
        return t.pin_memory() if self.device.startswith("cuda") else t

    @torch.no_grad()
    def texts(self, texts: list[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[N, D] L2-normalized text embeddings (``normalize=False``: raw, ``text_embeds``)
        of texts, or of the input ids `tokens` made of them."""
        t = (texts if torch.is_tensor(texts) else self.tokens(texts)).to(self.device, non_blocking=True)
        with inference_autocast(self.device):
            e = self.model.encode_text(t).float()
        return (torch.nn.functional.normalize(e, dim=-1) if normalize else e).cpu()


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_open_clip(path: str, seed: int = 0) -> str:
    """A tiny random open_clip model as a local directory in the format `ClipEmbedder`
    loads (tests, the demo and the trainer's ``tiny:clip``): its scores mean nothing."""
    import open_clip

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    torch.save(model.state_dict(), os.path.join(path, "open_clip_pytorch_model.bin"))
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}, f)
    return path
