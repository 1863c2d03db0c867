"""Aesthetic score: LAION's aesthetic predictor v2 design, an MLP (768-1024-128-64-16-1,
dropout between, no activation) on normalized CLIP ViT-L-14 image embeddings, trained to
predict ratings on a 1 to 10 scale. The output is clipped to that scale."""

from __future__ import annotations

import pyarrow as pa
import torch

from .heads import MLPHead, load_head
from mmloom.models import fingerprint


class AestheticScorer:
    """The ``aesthetic`` column as a scorer (`filters.base.Scorer`)."""

    columns = {"aesthetic": pa.float32()}

    def __init__(self, ref: str, clip_ref: str):
        self.head, path = load_head(ref, "aesthetic head", ("sac+logos+ava1-l14-linearMSE.pth", "model.pth", "model.pt"), "none")
        self.needs_clip = clip_ref
        self.version = f"aesthetic mlp {fingerprint(path)} on {clip_ref}"
        self.meta = {"aesthetic": {"model": ref, "version": self.version}}

    def score(self, batch) -> dict[str, list]:
        return {"aesthetic": self(batch.images, batch.clip_images(self.needs_clip))}

    @torch.no_grad()
    def __call__(self, images, embeddings, detections=None) -> list[float]:
        return self.head(embeddings)[:, 0].clamp(1.0, 10.0).tolist()


def save_aesthetic_head(path: str, in_dim: int = 768, seed: int = 0) -> None:
    """A random head with LAION's exact layout (Linear at 0, 2, 4, 6, 7)."""
    torch.manual_seed(seed)
    sizes = {0: (1024, in_dim), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    torch.save(MLPHead(sizes, "none").state_dict(), path)
