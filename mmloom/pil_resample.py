"""Pillow's resize and grey conversion, bit for bit, as tensor operations on any device.

Why: on a GPU the score stage's CPU side (decoding, open_clip's Pillow resize and crop,
phash's grey 32x32) could not keep up with CLIP ViT-L/14 (issue 16: 46% of the models'
speed on an H200 with 16 cores, half of the CPU cost in the resizes). Running the resizes
where the model runs leaves the CPU only decoding; doing them with Pillow's own
arithmetic keeps every score and hash identical to the CPU path's, so the faster path
needs no caveat.

Pillow (`libImaging/Resample.c`) resizes in two passes, one per axis, each into 8-bit
pixels (which pass comes first: `pass_order`): each output pixel is ``clip8(2**21 + sum(in * k))``, where the ``k``
are the filter's weights at the pixel's source span, normalized to sum 1 and rounded to
integers at 22 fractional bits, and ``clip8`` shifts right by 22 and clamps to 0-255.
Here each pass is a matrix product of the pixels with a dense [out, in] matrix of those
integer weights, in float64: every product and partial sum is an integer far below 2**53,
so the sums are exact in any order and the results equal Pillow's (tests/test_pil_resample.py
compares them on many sizes, up and down). The weights are computed once per size pair in
Python with `math.sin` (the C library's, as Pillow's), so the rounding to integers is
Pillow's too. Which pass comes first is learnt per size pair from Pillow itself
(`pass_order`). Grey is Pillow's ITU-R 601-2 integer formula (`Convert.c`, ``rgb2l``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch

PRECISION_BITS = 32 - 8 - 2  # Resample.c, 8 bits per channel


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float) -> float:
    a = -0.5  # Resample.c's bicubic_filter
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


# name -> (filter, support), Resample.c's filters; names as PIL.Image.Resampling's
FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0)}


@functools.lru_cache(maxsize=512)
def weights(in_size: int, out_size: int, kind: str) -> torch.Tensor:
    """[out_size, in_size] float64: Pillow's integer weights of each output pixel
    (``precompute_coeffs`` then ``normalize_coeffs_8bpc``), zero outside its span."""
    if kind not in FILTERS:
        raise ValueError(f"resampling filter {kind!r}: expected one of {', '.join(FILTERS)}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"cannot resample {in_size} pixels to {out_size}")
    fn, support = FILTERS[kind]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ss = 1.0 / filterscale
    one = 1 << PRECISION_BITS
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [fn((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = sum(k)  # Resample.c adds them in this order too
        if ww != 0.0:
            k = [w / ww for w in k]
        m[xx, xmin:xmin + xmax] = torch.tensor([int(w * one - 0.5) if w < 0 else int(w * one + 0.5) for w in k],
                                               dtype=torch.float64)
    return m


@functools.lru_cache(maxsize=512)
def _weights_on(in_size: int, out_size: int, kind: str, device: torch.device) -> torch.Tensor:
    return weights(in_size, out_size, kind).to(device)


def _pass(x: torch.Tensor, m: torch.Tensor, axis: int) -> torch.Tensor:
    """One of Resample.c's passes over ``axis`` (-1: horizontal, -2: vertical) of float64
    pixels: the weighted sum, Pillow's rounding offset, the shift and the clamp."""
    s = x @ m.T if axis == -1 else m @ x
    return torch.floor((s + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)).clamp_(0, 255)


def resize(x: torch.Tensor, size: tuple[int, int], kind: str = "bicubic",
           crop: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``PIL.Image.resize`` of uint8 images [..., C, H, W] (C = 1: mode L, 3: RGB) to
    ``size`` = (height, width) with Pillow's filter ``kind``: uint8 on x's device, equal to
    what the installed Pillow gives. ``crop`` = (top, left, height, width) in the resized
    image: only that window is computed (each output pixel depends on its own row's and
    column's weights alone), the same pixels as resizing, then cropping.

    Which pass runs first is Pillow's choice per size pair (`pass_order`): until it is
    known for these sizes, Pillow resizes these pictures on the CPU (what the CPU path
    costs anyway) and both orders are checked against its result."""
    h, w = size
    top, left, ch, cw = crop if crop is not None else (0, 0, h, w)
    if not (0 <= top and 0 <= left and top + ch <= h and left + cw <= w):
        raise ValueError(f"crop {crop} lies outside the resized {h}x{w} image")
    key = (*x.shape[-2:], h, w, kind, x.shape[-3])
    order = pass_order(*key)
    if order in ("hv", "vh"):
        return _resize(x, size, kind, order, (top, left, ch, cw))
    want = _with_pillow(x, size, kind).to(x.device)
    if order == "unknown":
        _learn(key, x, want)
    return want[..., top:top + ch, left:left + cw]


CHUNK_BYTES = 1 << 29  # float64 pixels resized at once: a batch of large pictures goes in parts


def _resize(x: torch.Tensor, size: tuple[int, int], kind: str, order: str,
            crop: tuple[int, int, int, int]) -> torch.Tensor:
    per_picture = x[0].numel() * 8 if x.dim() >= 4 else x.numel() * 8
    if x.dim() >= 4 and x.shape[0] > 1 and x.shape[0] * per_picture > CHUNK_BYTES:
        step = max(1, CHUNK_BYTES // per_picture)
        return torch.cat([_resize(x[i:i + step], size, kind, order, crop) for i in range(0, x.shape[0], step)])
    (h, w), (top, left, ch, cw) = size, crop
    y = x.to(torch.float64)
    for axis in order:  # Pillow skips a pass whose size does not change
        if axis == "h":
            y = (_pass(y, _weights_on(x.shape[-1], w, kind, x.device)[left:left + cw], -1) if w != x.shape[-1]
                 else y[..., left:left + cw])
        else:
            y = (_pass(y, _weights_on(x.shape[-2], h, kind, x.device)[top:top + ch], -2) if h != x.shape[-2]
                 else y[..., top:top + ch, :])
    return y.to(torch.uint8)


_ORDERS: dict[tuple, str | None] = {}  # (H, W, h, w, kind, channels) -> "hv", "vh" or None (neither)


def pass_order(H: int, W: int, h: int, w: int, kind: str, channels: int) -> str | None:
    """Which pass the installed Pillow runs first when resizing an H x W picture to h x w:
    "hv" (horizontal first, Resample.c's documented order), "vh", None when neither
    reproduces it (then Pillow resizes these sizes itself), or "unknown" before a picture
    of these sizes has told. Pillow 13 runs the vertical pass first for some sizes
    (measured: 72x172 -> 44x228 and 150x192 -> 20x145 bicubic, not 52x59 -> 26x38), and
    the two orders round their intermediate picture differently; the order depends on the
    sizes alone, never on the pixels."""
    if h == H or w == W:
        return "hv"  # one pass or none: no intermediate picture to round
    return _ORDERS.get((H, W, h, w, kind, channels), "unknown")


def _learn(key: tuple, x: torch.Tensor, want: torch.Tensor) -> None:
    """Record which order gives Pillow's result ``want`` for pictures ``x``: the order that
    alone matches, None when neither does; nothing when both do (a smooth picture whose
    roundings agree: the next picture of these sizes decides)."""
    if len(_ORDERS) >= 4096:
        _ORDERS.clear()
    size, full = key[2:4], (0, 0, *key[2:4])
    hv = torch.equal(_resize(x, size, key[4], "hv", full), want)
    vh = torch.equal(_resize(x, size, key[4], "vh", full), want)
    if hv != vh:
        _ORDERS[key] = "hv" if hv else "vh"
    elif not hv:
        _ORDERS[key] = None


def _with_pillow(x: torch.Tensor, size: tuple[int, int], kind: str) -> torch.Tensor:
    """Pillow's own resize of uint8 images [..., C, H, W] (C = 1 or 3), on the CPU."""
    import numpy as np
    from PIL import Image

    flat = x.detach().cpu().reshape(-1, *x.shape[-3:])
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "lanczos": Image.Resampling.LANCZOS}[kind]
    out = []
    for im in flat:
        a = im[0].numpy() if im.shape[0] == 1 else im.permute(1, 2, 0).numpy()
        r = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((size[1], size[0]), resample))
        out.append(torch.from_numpy(r.copy()).reshape(*size, -1).permute(2, 0, 1))
    return torch.stack(out).reshape(*x.shape[:-2], *size)


def upload(images, device) -> list[tuple[list[int], torch.Tensor]]:
    """PIL images (RGB) as uint8 tensors on ``device``, one [n, 3, H, W] tensor per size:
    (the images' positions in ``images``, the tensor). Page-locked on the way to a GPU, so
    the copy does not wait for the work already queued there."""
    import numpy as np

    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    out = []
    cuda = str(device).startswith("cuda")
    for idx in groups.values():
        t = torch.from_numpy(np.stack([np.asarray(images[i], dtype=np.uint8) for i in idx])).permute(0, 3, 1, 2)
        out.append((idx, (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)))
    return out


def grey(x: torch.Tensor) -> torch.Tensor:
    """``PIL.Image.convert("L")`` of uint8 RGB images [..., 3, H, W] -> [..., 1, H, W]."""
    r, g, b = (x[..., i:i + 1, :, :].to(torch.int32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)


_streams = threading.local()


@contextlib.contextmanager
def side_stream(device):
    """Run the enclosed device work on this thread's own CUDA stream and wait for it at the
    end (a no-op off CUDA). The score stage's worker threads resize there while the models
    run on the default stream: on the default stream every copy back to the host (phash's
    32x32) and every synchronous upload would wait for the models' queued work too.
    Tensors that the models then read must be marked with `hand_over`."""
    if device is None or not str(device).startswith("cuda"):
        yield
        return
    dev = torch.device(device)
    key = str(dev)
    streams = getattr(_streams, "by_device", None)
    if streams is None:
        streams = _streams.by_device = {}
    if key not in streams:
        streams[key] = torch.cuda.Stream(dev)
    with torch.cuda.stream(streams[key]):
        yield
    streams[key].synchronize()


def hand_over(t: torch.Tensor) -> torch.Tensor:
    """Mark a tensor made on a `side_stream` as read by the default stream, so that its
    memory is not reused before the models' kernels that read it have run."""
    if t.is_cuda:
        t.record_stream(torch.cuda.default_stream(t.device))
    return t
