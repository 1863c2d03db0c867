"""Any Hugging Face image-classification model as a probability of some labels.

Used for NSFW and watermark: ``positive_labels`` are regular expressions matched against
the model's ``id2label``; the score is the summed softmax probability of those labels,
the scorer's one ``column`` (`filters.base.Scorer`).
"""

from __future__ import annotations

import re

import torch

from mmloom.errors import UserError
from .base import PROBABILITY
from mmloom.models import fingerprint, hf_pretrained, package_version


class HfImageClassifier:
    needs_clip = None

    def __init__(self, ref: str, positive_labels: list[str], device: str = "cpu", what: str = "image classifier",
                 column: str = "probability"):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.processor = hf_pretrained(AutoImageProcessor, ref, what)
        self.model = hf_pretrained(AutoModelForImageClassification, ref, what).to(device).eval()
        self.device = device
        labels = self.model.config.id2label
        pats = [re.compile(p, re.IGNORECASE) for p in positive_labels]
        self.positive = [int(i) for i, name in labels.items() if any(p.search(str(name)) for p in pats)]
        if not self.positive:
            raise UserError(f"{what} {ref}: none of its labels {sorted(labels.values())} matches {positive_labels}")
        self.version = f"transformers {package_version('transformers')}, weights {fingerprint(ref)}, labels {[labels[i] for i in self.positive]}"
        self.column = column
        self.columns = {column: PROBABILITY}
        self.meta = {column: {"model": f"{column}/hf:{ref}", "version": self.version}}

    def prepare(self, batch) -> None:
        batch.ready((self.column, id(self)), lambda: self.inputs(batch.images))

    def score(self, batch) -> dict[str, list]:
        return {self.column: self(batch.ready((self.column, id(self)), lambda: self.inputs(batch.images)))}

    def inputs(self, pil_images):
        """The processor's tensors for a batch (CPU work, no model call)."""
        return self.processor(images=[im.convert("RGB") for im in pil_images], return_tensors="pt")

    @torch.no_grad()
    def __call__(self, pil_images, embeddings=None, detections=None) -> list[float]:
        """Of PIL images, or of the batch `inputs` made of them."""
        inputs = (self.inputs(pil_images) if isinstance(pil_images, (list, tuple)) else pil_images).to(self.device)
        probs = self.model(**inputs).logits.float().softmax(-1)
        return probs[:, self.positive].sum(-1).cpu().tolist()
