"""Geometry of the downloaded image and near-duplicate hashes, as scorers
(`filters.base.Scorer`)."""

from __future__ import annotations

import pyarrow as pa


def geometry(img) -> dict:
    w, h = img.size
    return {"width": w, "height": h, "aspect": w / h if h else None, "area": w * h, "min_side": min(w, h)}


def phash(img) -> tuple[str, int]:
    """64-bit DCT perceptual hash as hex and as a signed int64 (for DuckDB bit_count(a # b))."""
    return phashes([img])[0]


def phashes(images, uploaded=None) -> list[tuple[str, int]]:
    """`phash` of each image: imagehash.phash's computation (grey, 32x32 with its
    resampling filter, DCT over both axes, the 8x8 low frequencies against their median)
    run on the whole batch at once, the same 64 bits (tests/test_scorers.py checks it
    against imagehash). Batched so that the per-image work is Pillow's grey conversion and
    resize, which run without Python's lock, and one SciPy and NumPy call serves the batch:
    imagehash makes several lock-holding calls per image, in the score stage's worker
    threads beside the thread that drives the GPU (issue 16).

    ``uploaded``: the RGB images on a device, one uint8 [n, 3, H, W] tensor per size
    (`filters.base.Batch.uploaded`): the grey 32x32 is made there with Pillow's arithmetic
    (`mmloom.pil_resample`, the same pixels) and only it comes back for the DCT."""
    import imagehash
    import numpy as np
    from scipy import fftpack

    if not images:
        return []
    if uploaded is not None:
        from mmloom import pil_resample

        px = np.empty((len(images), 32, 32), dtype=np.uint8)
        for idx, x in uploaded:
            px[idx] = pil_resample.resize(pil_resample.grey(x), (32, 32), "lanczos")[:, 0].cpu().numpy()
    else:
        px = np.stack([np.asarray(im.convert("L").resize((32, 32), imagehash.ANTIALIAS)) for im in images])
    dct = fftpack.dct(fftpack.dct(px, axis=1), axis=2)[:, :8, :8].reshape(len(images), 64)
    return hash_columns(dct > np.median(dct, axis=1, keepdims=True))


def hash_columns(bits) -> list[tuple[str, int]]:
    """[N, 64] booleans (row-major, imagehash's order) -> (16 hex digits, the same 64 bits
    as a two's-complement int64) per row."""
    import numpy as np

    packed = np.packbits(np.asarray(bits, dtype=bool), axis=1)  # [N, 8], big-endian
    signed = packed.view(">i8")[:, 0].tolist()
    return [(p.tobytes().hex(), v) for p, v in zip(packed, signed)]


class Geometry:
    """Width, height, aspect, area and shorter side of each downloaded image."""

    columns = {"width": pa.int32(), "height": pa.int32(), "aspect": pa.float32(), "area": pa.int64(), "min_side": pa.int32()}
    needs_clip = None

    def __init__(self):
        from mmloom import __version__

        self.meta = {c: {"model": "geometry of the downloaded image", "version": f"mmloom {__version__}"} for c in self.columns}

    def prepare(self, batch) -> None:
        self.score(batch)

    def score(self, batch) -> dict[str, list]:
        return batch.ready(("geometry",), lambda: self._columns(batch.images))

    def _columns(self, images) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in self.columns}
        for im in images:
            for k, v in geometry(im).items():
                out[k].append(v)
        return out


class PHash:
    """The perceptual hash for near-duplicate grouping, as hex and as a signed int64."""

    columns = {"phash": pa.string(), "phash_int": pa.int64()}
    needs_clip = None

    def __init__(self, device: str | None = None):
        """``device``: make the grey 32x32 there (`phashes`' ``uploaded``; RGB images only)."""
        from mmloom.models import package_version

        self.device = device
        self.meta = {c: {"model": "imagehash.phash (64-bit DCT)", "version": package_version("imagehash")} for c in self.columns}

    def prepare(self, batch) -> None:
        self.score(batch)

    def score(self, batch) -> dict[str, list]:
        on_device = self.device is not None and all(im.mode == "RGB" for im in batch.images)
        hashes = batch.ready(("phash",), lambda: phashes(batch.images, batch.uploaded(self.device) if on_device else None))
        return {"phash": [h[0] for h in hashes], "phash_int": [h[1] for h in hashes]}
