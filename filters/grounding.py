"""Open-vocabulary grounding of caption phrases with Grounding DINO (transformers).

The prompt is the clean caption itself, so each box comes back tied to the caption
tokens it matched; token offsets turn those into a character span of the clean caption
(widened to whole words) and the phrase is that slice. Images in a batch each have
their own caption. Head boxes for person boxes come from OpenCV's face cascade (ships
its weights) or from the detector prompted with "head".
"""

from __future__ import annotations

import re

import torch

from mmloom.models import fingerprint, hf_pretrained, package_version
from .scoring import resolve_device


def _word_bounds(text: str, s: int, e: int) -> tuple[int, int]:
    is_word = lambda ch: ch.isalnum() or ch in "'-"  # noqa: E731
    while s > 0 and is_word(text[s - 1]):
        s -= 1
    while e < len(text) and is_word(text[e]):
        e += 1
    return s, e


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class GroundingDino:
    def __init__(self, ref: str, box_threshold: float, text_threshold: float, device: str = "auto"):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.device = resolve_device(device)
        self.processor = hf_pretrained(AutoProcessor, ref, "grounding model")
        self.model = hf_pretrained(AutoModelForZeroShotObjectDetection, ref, "grounding model").to(self.device).eval()
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.ref = ref
        self.version = f"transformers {package_version('transformers')} {type(self.model).__name__}, weights {fingerprint(ref)}"

    @staticmethod
    def prompt_text(caption: str) -> str:
        """Grounding DINO's convention (lowercase, ending in '.') without moving offsets."""
        low = caption.lower()
        text = low if len(low) == len(caption) else caption
        return text if text.endswith(".") else text + "."

    @torch.no_grad()
    def detect(self, images, captions: list[str]) -> list[list[dict]]:
        """Per image: boxes (pixels, x0 y0 x1 y1) with phrase, span (in the caption), score."""
        texts = [self.prompt_text(c) for c in captions]
        inputs = self.processor(images=images, text=texts, padding="longest", return_tensors="pt").to(self.device)
        with torch.autocast(self.device.split(":")[0], enabled=self.device.startswith("cuda"), dtype=torch.bfloat16):
            out = self.model(**inputs)
        probs = out.logits.float().sigmoid().cpu()  # [B, Q, T]
        boxes = out.pred_boxes.float().cpu()  # [B, Q, 4] cx cy w h, normalized
        results = []
        for b, (im, cap, text) in enumerate(zip(images, captions, texts)):
            offsets = self.processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
            valid = torch.zeros(probs.shape[-1], dtype=torch.bool)
            for t, (s, e) in enumerate(offsets[: probs.shape[-1]]):
                valid[t] = e > s and e <= len(cap) and any(ch.isalnum() for ch in cap[s:e])
            W, H = im.size
            found = []
            for q in range(probs.shape[1]):
                p = torch.where(valid, probs[b, q], torch.zeros_like(probs[b, q]))
                score = float(p.max())
                if score < self.box_threshold:
                    continue
                best = int(p.argmax())
                lo = hi = best
                while lo - 1 >= 0 and valid[lo - 1] and p[lo - 1] > self.text_threshold:
                    lo -= 1
                while hi + 1 < len(p) and valid[hi + 1] and p[hi + 1] > self.text_threshold:
                    hi += 1
                s, e = _word_bounds(cap, offsets[lo][0], offsets[hi][1])
                cx, cy, w, h = boxes[b, q].tolist()
                box = [max(0.0, (cx - w / 2) * W), max(0.0, (cy - h / 2) * H), min(W, (cx + w / 2) * W), min(H, (cy + h / 2) * H)]
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    continue
                found.append({"phrase": cap[s:e], "span": [s, e], "box": [round(v, 1) for v in box],
                              "score": round(score, 4), "text_score": round(float(p[lo:hi + 1].mean()), 4)})
            results.append(found)
        return results


def is_person(phrase: str, person_words: list[str]) -> bool:
    words = set(re.findall(r"[a-z]+", phrase.lower()))
    return bool(words & {w.lower() for w in person_words})


class HeadFinder:
    """A head box inside a person box."""

    def __init__(self, source: str, expand: float, detector: GroundingDino | None = None):
        self.source, self.expand, self.detector = source, expand, detector
        if source == "face":
            from .faces import OpenCvFaces

            self.faces = OpenCvFaces(min_size=12)
            self.version = self.faces.version
        else:
            self.version = f"{detector.ref} prompted with 'head'" if detector else "none"

    def __call__(self, image, person_box) -> list[float] | None:
        x0, y0, x1, y1 = [int(round(v)) for v in person_box]
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        crop = image.crop((x0, y0, x1, y1))
        if self.source == "face":
            faces = self.faces([crop])[0]
            if not faces:
                return None
            fx0, fy0, fx1, fy1 = max(faces, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
            cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2 - 0.1 * (fy1 - fy0)  # heads extend upwards (hair)
            half = self.expand * max(fx1 - fx0, fy1 - fy0) / 2
            box = [cx - half, cy - half, cx + half, cy + half]
        elif self.source == "detector" and self.detector is not None:
            dets = self.detector.detect([crop], ["head"])[0]
            if not dets:
                return None
            box = max(dets, key=lambda d: d["score"])["box"]
        else:
            return None
        w, h = x1 - x0, y1 - y0
        box = [max(0.0, box[0]), max(0.0, box[1]), min(w, box[2]), min(h, box[3])]
        return [round(box[0] + x0, 1), round(box[1] + y0, 1), round(box[2] + x0, 1), round(box[3] + y0, 1)]
