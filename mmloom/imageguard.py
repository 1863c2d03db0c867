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
