"""NSFW probability, three interchangeable backends behind one call:
``scorer(images, embeddings) -> list[float]`` in [0, 1], and as scorers of the ``nsfw``
column (`filters.base.Scorer`).

* ``nudenet``: nudenet's detector (ships its ONNX weights): the highest score among its
  exposed-body-part classes. Real decisions offline.
* ``clip_mlp``: an MLP head on normalized CLIP image embeddings (LAION's detector design).
* ``hf``: any Hugging Face image-classification model (labels matching ``positive_labels``),
  through `filters.hf_classifier.HfImageClassifier`.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import PROBABILITY
from .heads import load_head
from mmloom.models import fingerprint, package_version

NUDENET_EXPOSED = {
    "FEMALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED", "ANUS_EXPOSED",
}
NUDENET_FACES = {"FACE_FEMALE", "FACE_MALE"}


class NudeNet:
    """nudenet's detector, shared by the NSFW score and the face counter."""

    def __init__(self):
        from nudenet import NudeDetector

        self.detector = NudeDetector()
        self.version = f"nudenet {package_version('nudenet')} (320n.onnx)"

    def detect(self, pil_images) -> list[list[dict]]:
        # nudenet converts RGBA->BGR itself, so hand it RGBA arrays
        return [self.detector.detect(np.asarray(im.convert("RGBA"))) for im in pil_images]


class NudeNetNsfw:
    columns = {"nsfw": PROBABILITY}
    needs_clip = None

    def __init__(self, nudenet: NudeNet):
        self.nn = nudenet
        self.version = nudenet.version
        self.meta = {"nsfw": {"model": "nsfw/nudenet:nudenet", "version": self.version}}

    def score(self, batch) -> dict[str, list]:
        return {"nsfw": self(batch.images, None, batch.detections(self.nn))}

    def __call__(self, images, embeddings=None, detections=None) -> list[float]:
        dets = detections if detections is not None else self.nn.detect(images)
        return [max([d["score"] for d in ds if d["class"] in NUDENET_EXPOSED], default=0.0) for ds in dets]


class ClipMlpNsfw:
    columns = {"nsfw": PROBABILITY}

    def __init__(self, ref: str, clip_ref: str):
        self.head, path = load_head(ref, "NSFW head", ("nsfw_head.pt", "model.pt", "model.pth"), "relu")
        self.needs_clip = clip_ref
        self.version = f"mlp head {fingerprint(path)} on {clip_ref}"
        self.meta = {"nsfw": {"model": f"nsfw/clip_mlp:{ref}", "version": self.version}}

    def score(self, batch) -> dict[str, list]:
        return {"nsfw": self(batch.images, batch.clip_images(self.needs_clip))}

    @torch.no_grad()
    def __call__(self, images, embeddings, detections=None) -> list[float]:
        out = self.head(embeddings)
        p = out.sigmoid()[:, 0] if out.shape[-1] == 1 else out.softmax(-1)[:, 1]
        return p.tolist()
