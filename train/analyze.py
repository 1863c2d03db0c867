"""A check that does not learn: find the colour and shape of the toy world's objects in a
picture by plain image analysis, to score whether a model put what its prompt names where
the prompt puts it (``mmloom eval``).

Per region (the picture cut into ``OBJECTS`` vertical strips, left to right, the order
a toy caption names its objects): pixels saturated enough to be an object are labelled
with the nearest of the four colours' hues; the region's colour is the label most of them
share (a share under ``MIN_SHARE`` finds nothing: noise has no dominant hue); the object
is the largest connected blob of that colour, and its shape is the nearest prototype in
(fill ratio of its bounding box, height of its centroid in the box): a square fills its
box, a circle fills pi/4 of it, a triangle half with its mass low, a star less than half.
Prototypes are measured on the shapes the toy world draws, at the picture's resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..testkit.toyworld import COLOURS, OBJECTS, SHAPES, draw_object

MIN_SATURATION, MIN_VALUE = 0.45, 0.25  # toy backgrounds stay below 0.3 saturation
MIN_SHARE = 0.6  # of a region's saturated pixels, for a colour to be the region's
MIN_AREA = 0.02  # of a region, for a blob to be an object
MAX_SHAPE_DISTANCE = 0.25  # farther from every prototype: no shape


@dataclass(frozen=True)
class Found:
    colour: str
    shape: str | None
    box: tuple[int, int, int, int]  # x0 y0 x1 y1 in the picture's pixels


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[H, W, 3] uint8 -> hue in degrees, saturation and value in [0, 1]."""
    x = rgb.astype(np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    s = np.where(mx > 0, d / np.maximum(mx, 1e-6), 0.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    dd = np.maximum(d, 1e-6)
    h = np.where(mx == r, ((g - b) / dd) % 6, np.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4)) * 60.0
    return h, s, mx


@lru_cache(maxsize=1)
def _colour_hues() -> tuple[list[str], np.ndarray]:
    names = list(COLOURS)
    hues, _, _ = _hsv(np.array([[COLOURS[n] for n in names]], dtype=np.uint8))
    return names, hues[0]


def colour_labels(rgb: np.ndarray) -> np.ndarray:
    """[H, W] index into COLOURS of each object-like pixel, -1 for background."""
    names, hues = _colour_hues()
    h, s, v = _hsv(rgb)
    diff = np.abs(h[..., None] - hues[None, None, :])
    diff = np.minimum(diff, 360 - diff)
    lab = diff.argmin(-1)
    return np.where((s >= MIN_SATURATION) & (v >= MIN_VALUE), lab, -1)


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """(fill ratio of the bounding box, centroid height in the box: 0 top, 1 bottom)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = len(ys) / float((y1 - y0) * (x1 - x0))
    cy = (ys.mean() + 0.5 - y0) / (y1 - y0)
    return fill, float(cy)


@lru_cache(maxsize=16)
def prototypes(side: int) -> dict[str, tuple[float, float]]:
    """Each shape's features when the toy world draws it ``side`` pixels wide."""
    from PIL import Image, ImageDraw

    side = max(8, side)
    out = {}
    for shape in SHAPES:
        img = Image.new("L", (side + 4, side + 4), 0)
        draw_object(ImageDraw.Draw(img), shape, (2, 2, side + 1, side + 1), 255)
        out[shape] = shape_features(np.asarray(img) > 127)
    return out


def classify_shape(mask: np.ndarray) -> str | None:
    ys, xs = np.nonzero(mask)
    side = int(max(ys.max() - ys.min(), xs.max() - xs.min())) + 1
    f = np.array(shape_features(mask))
    dist = {s: float(np.linalg.norm(f - np.array(p))) for s, p in prototypes(side).items()}
    best = min(dist, key=dist.get)
    return best if dist[best] <= MAX_SHAPE_DISTANCE else None


def find_objects(image, regions: int = OBJECTS) -> list[Found | None]:
    """The object found in each vertical strip of ``image`` (PIL or [H, W, 3] uint8), left to right."""
    from scipy import ndimage

    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    labels = colour_labels(rgb)
    H, W = labels.shape
    names = list(COLOURS)
    found: list[Found | None] = []
    for k in range(regions):
        x0, x1 = round(k * W / regions), round((k + 1) * W / regions)
        lab = labels[:, x0:x1]
        sat = lab >= 0
        area = lab.size
        if sat.sum() < MIN_AREA * area:
            found.append(None)
            continue
        counts = np.bincount(lab[sat], minlength=len(names))
        c = int(counts.argmax())
        if counts[c] < MIN_SHARE * sat.sum():
            found.append(None)
            continue
        blobs, n = ndimage.label(lab == c)
        sizes = np.bincount(blobs.ravel())[1:]
        biggest = int(sizes.argmax()) + 1
        if sizes[biggest - 1] < max(12, MIN_AREA * area):
            found.append(None)
            continue
        mask = blobs == biggest
        ys, xs = np.nonzero(mask)
        found.append(Found(names[c], classify_shape(mask), (int(xs.min()) + x0, int(ys.min()), int(xs.max()) + 1 + x0, int(ys.max()) + 1)))
    return found


def adherence(image, expected: list[tuple[str, str]]) -> dict[str, float]:
    """Fractions of the ``expected`` (colour, shape) objects, k-th in the k-th strip, whose
    colour, shape, and both were found there."""
    found = find_objects(image, len(expected))
    col = [f is not None and f.colour == c for f, (c, _s) in zip(found, expected)]
    shp = [f is not None and f.shape == s for f, (_c, s) in zip(found, expected)]
    n = max(1, len(expected))
    return {"colour": sum(col) / n, "shape": sum(shp) / n, "both": sum(a and b for a, b in zip(col, shp)) / n}
