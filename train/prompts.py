"""Train-time multimodal prompts from final/ samples (MUMU section 5).

Rules, all from `PromptConfig`: the target image padded to square with black; each crop
padded to square and resized to its target size (never fewer tokens than the target);
at most ``max_crops`` crops; a person crop replaced by its head crop ``head_prob`` of the
time; ``augment_prob`` of conditioning images augmented (random crop, flip, Gaussian
noise, grayscale); stage 1 optionally appends a Canny-edge image of the whole input
``structure_prob`` of the time; stage 2 keeps a single high-resolution face or person
crop. Randomness comes from the ``random.Random`` passed in, so a sample's prompt is a
function of (seed, sample index): resuming training reproduces it exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from .config import PromptConfig


def pad_to_square(img: Image.Image, fill=(0, 0, 0)) -> Image.Image:
    w, h = img.size
    s = max(w, h)
    out = Image.new("RGB", (s, s), fill)
    out.paste(img.convert("RGB"), ((s - w) // 2, (s - h) // 2))
    return out


def square(img: Image.Image, size: int) -> Image.Image:
    """Pad to square with black, then resize up or down to ``size``."""
    return pad_to_square(img).resize((size, size), Image.BICUBIC)


def augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """At least one of: random crop, horizontal flip, Gaussian noise, grayscale."""
    ops = [op for op in ("crop", "flip", "noise", "gray") if rng.random() < 0.5] or [rng.choice(["crop", "flip", "noise", "gray"])]
    w, h = img.size
    if "crop" in ops:
        f = rng.uniform(0.7, 1.0)
        cw, ch = max(1, int(w * f)), max(1, int(h * f))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
    if "flip" in ops:
        img = ImageOps.mirror(img)
    if "noise" in ops:
        arr = np.asarray(img).astype(np.float32)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(5, 20), arr.shape)
        img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    if "gray" in ops:
        img = ImageOps.grayscale(img).convert("RGB")
    return img


def canny(img: Image.Image) -> Image.Image:
    import cv2

    edges = cv2.Canny(np.asarray(img.convert("L")), 100, 200)
    return Image.fromarray(edges).convert("RGB")


def _cut(sheet: Image.Image, rect, what: str) -> Image.Image:
    """One crop of the ``crops.jpg`` sheet; a rectangle outside it is the shard's error."""
    if not (isinstance(rect, list) and len(rect) == 4 and all(isinstance(v, int) for v in rect)):
        raise ValueError(f"{what}: rect {rect!r} is not four integers")
    x0, y0, x1, y1 = rect
    if not (0 <= x0 < x1 <= sheet.size[0] and 0 <= y0 < y1 <= sheet.size[1]):
        raise ValueError(f"{what}: rect {rect} lies outside crops.jpg ({sheet.size[0]}x{sheet.size[1]})")
    return sheet.crop((x0, y0, x1, y1))


def resolve_segments(sample: dict) -> list[dict]:
    """The sample's segments with their pictures: text segments as they are; image
    segments as ``{"type": "image", "text", "phrase", "label", "image": PIL, "head": PIL or
    None}``. Reads the build stage's layout (``crops.jpg`` and ``prompt.json``'s crop
    rectangles, `curate/prompt.py`) and the one before it (a ``cropN.jpg`` member per crop)."""
    p = sample["prompt.json"]
    key = sample.get("__key__", "?")
    out = []
    for s in p["segments"]:
        if s["type"] != "image":
            out.append(s)
        elif "crops" in p:
            crops, sheet = p["crops"], sample.get("crops.jpg")
            if sheet is None:
                raise ValueError(f"{key}: prompt.json names crops but the sample has no crops.jpg")
            i = s.get("crop")
            if not isinstance(i, int) or not 0 <= i < len(crops):
                raise ValueError(f"{key}: image segment points at crop {i!r} of {len(crops)}")
            c = crops[i]
            h = c.get("head", -1)
            head = _cut(sheet, crops[h]["rect"], f"{key} head of crop {i}") if isinstance(h, int) and 0 <= h < len(crops) else None
            out.append({"type": "image", "text": "", "phrase": c["phrase"], "label": c["label"],
                        "image": _cut(sheet, c["rect"], f"{key} crop {i}"), "head": head})
        else:  # before crops.jpg: one member per crop
            hm = s.get("head_member")
            out.append({"type": "image", "text": "", "phrase": s.get("phrase", ""), "label": s.get("label", ""),
                        "image": sample[s["member"]], "head": sample[hm] if hm and hm in sample else None})
    return out


@dataclass
class Prompt:
    """An interleaved prompt: strings and PIL images, in order."""

    parts: list = field(default_factory=list)
    # what the builder decided, for tests and logging
    head_swaps: int = 0
    person_crops: int = 0
    augmented: int = 0
    structure: bool = False

    @property
    def images(self) -> list[Image.Image]:
        return [p for p in self.parts if isinstance(p, Image.Image)]

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))


class PromptBuilder:
    def __init__(self, cfg: PromptConfig):
        self.cfg = cfg

    def __call__(self, sample: dict, rng: random.Random) -> Prompt:
        """``sample``: a decoded final/ sample (PIL images, ``prompt.json`` dict)."""
        cfg = self.cfg
        segs = resolve_segments(sample)
        images = [i for i, s in enumerate(segs) if s["type"] == "image"]
        if cfg.stage == 2:
            people = [i for i in images if segs[i].get("label") == "person"]
            keep = set(rng.sample(people or images, k=1)) if images else set()
            size = cfg.stage2_crop_size
        else:
            keep = set(sorted(rng.sample(images, k=min(cfg.max_crops, len(images)))))
            size = cfg.crop_size
        out = Prompt()
        for i, s in enumerate(segs):
            if s["type"] == "text":
                out.parts.append(s["text"])
                continue
            if i not in keep:
                continue
            crop = s["image"]
            if s.get("label") == "person":
                out.person_crops += 1
                if s["head"] is not None and rng.random() < cfg.head_prob:
                    crop = s["head"]
                    out.head_swaps += 1
            if rng.random() < cfg.augment_prob:
                crop = augment(crop, rng)
                out.augmented += 1
            out.parts.append(square(crop, size))
        if cfg.stage == 1 and cfg.structure and rng.random() < cfg.structure_prob:
            out.parts.append(square(canny(sample["jpg"]), size))
            out.structure = True
        return out


def read_picture(path: str, base_dir: str = ".", what: str = "prompt image") -> Image.Image:
    """The user's picture at ``path`` (relative to ``base_dir``), as RGB."""
    import os

    from mmloom.errors import UserError

    full = path if os.path.isabs(path) else os.path.join(base_dir, path)
    try:
        return Image.open(full).convert("RGB")
    except OSError as e:
        raise UserError(f"{what} {path!r} cannot be read: {e}") from None


def parse_prompt(text: str, base_dir: str = ".") -> list:
    """'a <image:man.jpg> man and his <image:dog.jpg> dog' -> ['a ', PIL, ' man and his ', PIL, ' dog']."""
    import re

    parts: list = []
    pos = 0
    for m in re.finditer(r"<image:([^>]+)>", text):
        if m.start() > pos:
            parts.append(text[pos:m.start()])
        parts.append(read_picture(m.group(1).strip(), base_dir))
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


