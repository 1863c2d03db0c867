"""Geometry of the downloaded image and near-duplicate hashes."""

from __future__ import annotations


def geometry(img) -> dict:
    w, h = img.size
    return {"width": w, "height": h, "aspect": w / h if h else None, "area": w * h, "min_side": min(w, h)}


def phash(img) -> tuple[str, int]:
    """64-bit DCT perceptual hash as hex and as a signed int64 (for DuckDB bit_count(a # b))."""
    import imagehash

    hx = str(imagehash.phash(img))
    v = int(hx, 16)
    return hx, v - (1 << 64) if v >= (1 << 63) else v
