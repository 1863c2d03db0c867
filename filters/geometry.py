"""Geometry of the downloaded image and near-duplicate hashes, as scorers
(`filters.base.Scorer`)."""

from __future__ import annotations

import pyarrow as pa


def geometry(img) -> dict:
    w, h = img.size
    return {"width": w, "height": h, "aspect": w / h if h else None, "area": w * h, "min_side": min(w, h)}


def phash(img) -> tuple[str, int]:
    """64-bit DCT perceptual hash as hex and as a signed int64 (for DuckDB bit_count(a # b))."""
    import imagehash

    hx = str(imagehash.phash(img))
    v = int(hx, 16)
    return hx, v - (1 << 64) if v >= (1 << 63) else v


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

    def __init__(self):
        from mmloom.models import package_version

        self.meta = {c: {"model": "imagehash.phash (64-bit DCT)", "version": package_version("imagehash")} for c in self.columns}

    def prepare(self, batch) -> None:
        self.score(batch)

    def score(self, batch) -> dict[str, list]:
        hashes = batch.ready(("phash",), lambda: [phash(im) for im in batch.images])
        return {"phash": [h[0] for h in hashes], "phash_int": [h[1] for h in hashes]}
