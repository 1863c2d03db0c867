"""Look at image bytes from strangers before anything decodes them.

Every image mmloom accepts, at download and when training reads shards, passes
``inspect`` first: the format must be one of ``FORMATS`` (recognised by its magic bytes
through Pillow's plugin for that format only), and the pixel count is read from the
header and compared with ``max_pixels`` before a single pixel is decoded. OpenCV, which
img2dataset decodes with, knows many more formats (Radiance HDR, PFM, OpenEXR, TIFF,
JPEG 2000 ...) and decodes a 20000x20000 HDR into 9 GiB; those never reach it. Truncated
JPEG and PNG files are refused too (a decoder would fill the missing part with grey).

Animated GIF, WebP and APNG are accepted and only their first frame is used; the header
size bounds each frame.

``decode_rgb`` reads the images of committed shards: JPEGs whose frame header passes the
same pixel check are decoded by OpenCV (faster, without Python's lock, Pillow's pixels),
everything else by ``open_image``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

# Pillow format names; the README's threat model lists the same set
FORMATS = ("JPEG", "PNG", "WEBP", "GIF")

# OpenCV's own ceiling (its CV_IO_MAX_IMAGE_PIXELS), as a second line of defence; the
# environment variable OpenCV reads, once, when cv2 is imported
CV_MAX_PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"


class ImageRejected(ValueError):
    """The bytes are not an image mmloom accepts; ``status`` is the download status it
    ends in (``refused`` for pixel bombs, ``failed_to_resize`` for the rest)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _pillow_limit_off() -> None:
    """``inspect`` replaces Pillow's global pixel ceiling with the caller's ``max_pixels``
    (checked on every image mmloom accepts); Pillow's would refuse a large image the
    config allows, or warn on every one."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None


def inspect(data: bytes | bytearray | memoryview, max_pixels: int) -> ImageHeader:
    """Format and size from the header alone; raises ``ImageRejected`` for anything else."""
    from PIL import Image, UnidentifiedImageError

    _pillow_limit_off()
    buf = bytes(data)
    try:
        with Image.open(io.BytesIO(buf), formats=FORMATS) as im:
            fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError as e:  # Pillow's own ceiling, if the caller left it on
        raise ImageRejected("refused", f"image above Pillow's pixel limit ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        head = buf[:12]
        raise ImageRejected("failed_to_resize", f"not a supported image ({'/'.join(FORMATS)}): {_describe(head, e)}") from None
    if w <= 0 or h <= 0:
        raise ImageRejected("failed_to_resize", f"{fmt} header declares an empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageRejected("refused", f"image is {w}x{h} = {w * h} pixels, above max_pixels {max_pixels}")
    tail = buf[-2048:]
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise ImageRejected("failed_to_resize", "truncated image: JPEG has no end-of-image marker")
    if fmt == "PNG" and b"IEND" not in tail[-64:]:
        raise ImageRejected("failed_to_resize", "truncated image: PNG has no IEND chunk")
    return ImageHeader(fmt, w, h)


def open_image(data: bytes | bytearray | memoryview, max_pixels: int, mode: str = "RGB", least: int | None = None):
    """``inspect``, then decode with Pillow (first frame) into ``mode``. ``least``: a JPEG
    is decoded at the smallest DCT scale (1/2, 1/4, 1/8; Pillow's ``draft``) that keeps
    both sides at least this many pixels, for a caller that shrinks it anyway."""
    from PIL import Image

    inspect(data, max_pixels)
    with Image.open(io.BytesIO(bytes(data)), formats=FORMATS) as im:
        try:
            im.seek(0)
            if least and im.format == "JPEG":
                im.draft(mode, (least, least))
            return im.convert(mode)
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageRejected("failed_to_resize", f"undecodable {im.format}: {e}") from None


def _describe(head: bytes, err: Exception) -> str:
    known = {b"#?RADIANCE": "Radiance HDR", b"#?RGBE": "Radiance HDR", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
             b"BM": "BMP", b"\x00\x00\x00\x0cjP": "JPEG 2000", b"v/1\x01": "OpenEXR", b"PF\n": "PFM", b"Pf\n": "PFM",
             b"<?xml": "XML/SVG", b"<svg": "SVG", b"<!DOCTYPE": "HTML", b"<html": "HTML", b"P6": "PPM", b"P5": "PGM"}
    for magic, name in known.items():
        if head.startswith(magic):
            return f"{name} data"
    return f"{type(err).__name__} on bytes {head[:8]!r}"


def decode_rgb(data: bytes, max_pixels: int):
    """The RGB picture of a shard's image bytes, as Pillow decodes it: how the score,
    ground and build stages read shards (a shard may come from anywhere). A complete 8-bit
    JPEG of 1 or 3 components (what the download stage writes) is decoded by OpenCV's
    libjpeg-turbo in one call that releases Python's lock, with Pillow's settings (islow
    IDCT, fancy upsampling, no EXIF rotation): the same pixels (tests/test_score_stage.py),
    and the score stage's thread that drives the GPU keeps the lock (issue 16). Anything
    else (CMYK, which OpenCV converts otherwise, 12-bit, a JPEG without its end marker,
    PNG, WebP) goes through `open_image`: the download stage's formats only, and a
    truncated file refused. Either way the header's pixel count is checked against
    ``max_pixels`` before a pixel is decoded."""
    sof = jpeg_frame(data) if data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9" else None
    if sof is not None and sof[:2] in ((8, 1), (8, 3)):
        if sof[2] * sof[3] > max_pixels:
            raise ImageRejected("refused", f"JPEG of {sof[3]}x{sof[2]} pixels is above max_pixels {max_pixels}")
        import cv2
        import numpy as np
        from PIL import Image

        a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if a is not None:
            return Image.fromarray(cv2.cvtColor(a, cv2.COLOR_BGR2RGB))
    return open_image(data, max_pixels)


# start-of-frame markers: baseline, extended, progressive, lossless, with Huffman or arithmetic coding
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(sample precision, component count, height, width) from a JPEG's start-of-frame
    header, walking the marker segments before it; None when there is none before the scan
    or it is cut short."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        if m in _SOF:
            if i + 10 > n:
                return None
            return data[i + 4], data[i + 9], int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        if m in (0xDA, 0xD9):  # the scan or the end before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None
