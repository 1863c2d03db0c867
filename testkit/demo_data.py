"""The demo's embedded dataset: real photographs that ship inside installed packages
(scikit-image's data images, matplotlib's sample photo), hand-written captions, a few
generated pictures, and entries broken on purpose (each a fault the pipeline must record).
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

from .localserver import Route

# (file inside scikit-image's data folder or matplotlib's sample_data, caption)
PHOTOS = [
    ("skimage:astronaut.png", "a woman astronaut in a white spacesuit with a flag behind her"),
    ("skimage:coffee.png", "a cup of coffee on a saucer with a spoon"),
    ("skimage:chelsea.png", "a ginger cat looking to the side"),
    ("skimage:rocket.jpg", "a rocket on the launch pad under a blue sky"),
    ("skimage:camera.png", "a man with a camera on a tripod in a field"),
    ("skimage:motorcycle_left.png", "a red motorcycle parked in a garage"),
    ("skimage:hubble_deep_field.jpg", "galaxies in the hubble deep field"),
    ("skimage:retina.jpg", "a photograph of a human retina"),
    ("skimage:immunohistochemistry", "stained cells under a microscope"),
    ("skimage:coins.png", "old coins laid out in rows"),
    ("skimage:brick.png", "a brick wall"),
    ("skimage:grass.png", "a patch of green grass"),
    ("skimage:gravel.png", "gravel on the ground"),
    ("matplotlib:grace_hopper.jpg", "a woman in a navy uniform with medals"),
]

SHAPES = [
    ("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"),
    ("purple", "square"), ("orange", "triangle"), ("white", "circle"), ("cyan", "square"),
]


def _load_photo(ref: str) -> np.ndarray:
    lib, name = ref.split(":", 1)
    if lib == "skimage":
        import skimage.data

        if name == "immunohistochemistry":
            return skimage.data.immunohistochemistry()
        return np.asarray(Image.open(os.path.join(os.path.dirname(skimage.data.__file__), name)).convert("RGB"))
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "sample_data", name)
    return np.asarray(Image.open(path).convert("RGB"))


def jpeg_bytes(img: Image.Image | np.ndarray, quality: int = 92) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def shape_image(color: str, shape: str, size: int = 384, seed: int = 0) -> Image.Image:
    """A generated picture of one coloured shape on a grey background."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (int(rng.integers(90, 160)),) * 3)
    d = ImageDraw.Draw(img)
    m = size // 5
    box = [m, m, size - m, size - m]
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=color)
    return img


def demo_images() -> list[tuple[str, bytes, str, int, int]]:
    """(name, jpeg bytes, caption, width, height) for every good demo image."""
    out = []
    for ref, caption in PHOTOS:
        arr = _load_photo(ref)
        name = ref.split(":", 1)[1].rsplit(".", 1)[0] + ".jpg"
        out.append((name, jpeg_bytes(arr), caption, arr.shape[1], arr.shape[0]))
    for i, (color, shape) in enumerate(SHAPES):
        img = shape_image(color, shape, seed=i)
        out.append((f"shape{i}.jpg", jpeg_bytes(img), f"a {color} {shape} on a grey background", *img.size))
    return out


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares an enormous image (a decompression bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _small(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, fmt, **kw)
    return buf.getvalue()


def pixel_bomb(fmt: str, side: int = 20000) -> bytes:
    """A small file whose header declares a huge image, in ``fmt``: PNG, JPEG, WEBP, GIF
    (formats mmloom accepts: refused on the header), HDR or PFM (Radiance HDR and Portable
    FloatMap, which OpenCV decodes into gigabytes of floats: not accepted at all; ``side`` x ``side``)."""
    if fmt == "PNG":
        return huge_png_header()
    if fmt == "JPEG":
        data = bytearray(_small("JPEG"))
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
        return bytes(data)
    if fmt == "WEBP":
        data = bytearray(_small("WEBP", quality=80))
        vp8 = data.index(b"\x9d\x01\x2a")  # VP8 key frame start code, then 14-bit sizes
        data[vp8 + 3:vp8 + 7] = struct.pack("<HH", 16383, 16383)
        return bytes(data)
    if fmt == "GIF":
        data = bytearray(_small("GIF"))
        data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen size
        return bytes(data)
    if fmt == "HDR":
        return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y %d +X %d\n" % (side, side) + b"\x02\x02" + struct.pack(">H", side) + bytes(256)
    if fmt == "PFM":
        return b"PF\n%d %d\n-1.0\n" % (side, side) + bytes(256)
    raise ValueError(f"no pixel bomb for {fmt}")


def other_format(fmt: str) -> bytes:
    """A small, valid image in a format mmloom does not accept (TIFF, BMP ...)."""
    return _small(fmt)


def fault_routes(good_jpeg: bytes, redirect_target: str, hang_seconds: float | None = None) -> dict[str, tuple[Route, str]]:
    """Faulty routes -> (route, the download status it must end in)."""
    routes = {
        "/fault/404.jpg": (Route(b"gone", 404, "text/plain"), "failed_to_download"),
        "/fault/500.jpg": (Route(b"boom", 500, "text/plain"), "failed_to_download"),
        "/fault/truncated.jpg": (Route(good_jpeg[: len(good_jpeg) // 2]), "failed_to_resize"),
        "/fault/not-an-image.jpg": (Route(b"<html><body>hello</body></html>", content_type="text/html"), "failed_to_resize"),
        "/fault/redirect.jpg": (Route(redirect_to=redirect_target), "success"),
        "/fault/huge.png": (Route(huge_png_header(), content_type="image/png"), "refused"),
        "/fault/bomb.hdr": (Route(pixel_bomb("HDR"), content_type="image/vnd.radiance"), "failed_to_resize"),
        "/fault/image.tiff": (Route(other_format("TIFF"), content_type="image/tiff"), "failed_to_resize"),
        "/fault/huge-body.jpg": (Route(stream_bytes=2**31), "failed_to_download"),
        "/fault/opt-out.jpg": (Route(good_jpeg, headers={"X-Robots-Tag": "noai, noimageai"}), "opted_out"),
    }
    if hang_seconds:
        routes["/fault/hang.jpg"] = (Route(good_jpeg, delay=hang_seconds), "failed_to_download")
    return routes
