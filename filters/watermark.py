"""Watermark probability: a timm backbone with LAION's classification head loaded from a
checkpoint (LAION's watermark detector design: efficientnet_b3a, head 1536-625-256-2,
class 0 = watermark), or any Hugging Face image-classification model."""

from __future__ import annotations

import torch
from torch import nn

from mmloom.errors import UserError
from .base import PROBABILITY
from mmloom.models import fingerprint, load_state_dict, package_version, resolve_file


def laion_head(in_features: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, 625), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2),
    )


def build_timm(arch: str, head: str) -> nn.Module:
    import timm

    try:
        model = timm.create_model(arch, pretrained=False, num_classes=2)
    except RuntimeError as e:
        raise UserError(f"watermark.arch {arch!r} is not a timm architecture ({e})") from None
    if head == "laion":
        model.reset_classifier(0)
        feats = model.num_features
        model.reset_classifier(2)
        setattr(model, model.default_cfg.get("classifier", "classifier"), laion_head(feats))
    return model


class TimmWatermark:
    """The ``watermark`` column as a scorer (`filters.base.Scorer`)."""

    columns = {"watermark": PROBABILITY}
    needs_clip = None

    def __init__(self, ref: str, arch: str, head: str, positive_index: int, device: str, image_size: int = 256):
        from torchvision import transforms as T

        path = resolve_file(ref, "watermark checkpoint", ("watermark_model_v1.pt", "model.pt", "model.pth"))
        self.model = build_timm(arch, head)
        try:
            self.model.load_state_dict(load_state_dict(path))
        except RuntimeError as e:
            raise UserError(f"watermark checkpoint {ref} does not fit timm {arch} with the {head} head: {str(e)[:300]}") from None
        self.model = self.model.to(device).eval()
        self.device, self.positive_index = device, positive_index
        # LAION's preprocessing: a plain resize to a square, ImageNet normalization
        self.transform = T.Compose([
            T.Resize((image_size, image_size)), T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])
        self.version = f"timm {package_version('timm')} {arch}, weights {fingerprint(path)}"
        self.meta = {"watermark": {"model": f"watermark/timm:{ref}", "version": self.version}}

    def prepare(self, batch) -> None:
        batch.ready(("watermark", id(self)), lambda: self.inputs(batch.images))

    def score(self, batch) -> dict[str, list]:
        return {"watermark": self(batch.ready(("watermark", id(self)), lambda: self.inputs(batch.images)))}

    def inputs(self, images) -> torch.Tensor:
        """The model's input batch (CPU work, no model call)."""
        x = torch.stack([self.transform(im.convert("RGB")) for im in images])
        return x.pin_memory() if self.device.startswith("cuda") else x

    @torch.no_grad()
    def __call__(self, images, embeddings=None, detections=None) -> list[float]:
        """Of PIL images, or of the batch `inputs` made of them."""
        x = (images if torch.is_tensor(images) else self.inputs(images)).to(self.device, non_blocking=True)
        return self.model(x).float().softmax(-1)[:, self.positive_index].cpu().tolist()


def save_timm_checkpoint(path: str, arch: str, head: str = "laion", seed: int = 0) -> None:
    """A random checkpoint in the format TimmWatermark loads (tests, demo)."""
    torch.manual_seed(seed)
    torch.save(build_timm(arch, head).state_dict(), path)
