"""`mmloom.pil_resample`: Pillow's resize and grey conversion as tensor operations must give
the installed Pillow's pixels exactly, so that the score stage on a GPU (which resizes there,
issue 16) writes the same scores and hashes as on the CPU."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmloom import pil_resample as R

FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def _pillow(a: np.ndarray, size, kind) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((size[1], size[0]), FILTERS[kind]))


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.copy()).permute(2, 0, 1) if a.ndim == 3 else torch.from_numpy(a.copy())[None]


def _array(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy() if t.shape[0] == 3 else t[0].numpy()


def _cases(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        H, W, h, w = (int(v) for v in rng.integers(1, 160, 4))
        kind = list(FILTERS)[i % 3]
        a = rng.integers(0, 256, (H, W, 3) if i % 4 else (H, W), dtype=np.uint8)
        yield a, (h, w), kind


def test_resize_is_pillows_bit_for_bit_up_down_and_mixed():
    """Random pictures (noise: every rounding shows) in RGB and L, each filter, sizes up,
    down, mixed and equal on one axis; Pillow 13 runs the vertical pass first for some of
    these sizes, and the intermediate image's rounding differs with the order."""
    cases = list(_cases(48, 0)) + [(np.random.default_rng(1).integers(0, 256, (72, 172, 3), dtype=np.uint8), (44, 228), "bicubic"),
                                   (np.random.default_rng(2).integers(0, 256, (60, 90, 3), dtype=np.uint8), (60, 45), "bicubic"),
                                   (np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8), (30, 90), "lanczos"),
                                   (np.random.default_rng(4).integers(0, 256, (256, 341, 3), dtype=np.uint8), (224, 298), "bicubic")]
    cases += [(np.random.default_rng(11).integers(0, 256, (60, 90, 3), dtype=np.uint8), (40, 60), "bicubic"),  # w == H
              (np.random.default_rng(12).integers(0, 256, (40, 60, 3), dtype=np.uint8), (60, 3), "bilinear"),  # w == C
              (np.random.default_rng(13).integers(0, 256, (30, 50, 3), dtype=np.uint8), (1, 1), "bicubic"),
              (np.random.default_rng(14).integers(0, 256, (30, 50), dtype=np.uint8), (1, 70), "lanczos")]
    for a, size, kind in cases:
        got = R.resize(_tensor(a), size, kind)
        assert got.dtype == torch.uint8
        assert np.array_equal(_array(got), _pillow(a, size, kind)), (a.shape, size, kind)
        # and this module's arithmetic reproduced it ("unknown": both orders did), not the fallback to Pillow
        assert R.pass_order(*a.shape[:2], *size, kind, 3 if a.ndim == 3 else 1) is not None, (a.shape, size, kind)
    # an unchanged size is the picture itself
    a = cases[0][0]
    assert torch.equal(R.resize(_tensor(a), a.shape[:2], "bicubic"), _tensor(a))


def test_resize_crop_window_is_the_crop_of_the_whole_resize():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    whole = R.resize(_tensor(a), (70, 101), "bicubic")
    for crop in [(0, 0, 70, 101), (3, 18, 64, 64), (6, 37, 64, 64), (0, 5, 70, 90)]:
        t, left, h, w = crop
        assert torch.equal(R.resize(_tensor(a), (70, 101), "bicubic", crop), whole[:, t:t + h, left:left + w])
    for bad in [(10, 0, 64, 64), (0, 40, 64, 64), (-1, 0, 10, 10), (0, -1, 10, 10)]:
        with pytest.raises(ValueError, match="outside"):
            R.resize(_tensor(a), (70, 101), "bicubic", bad)


@pytest.mark.parametrize("chunk", [None, 3 * 50 * 70 * 8 * 2])
def test_resize_of_a_batch_equals_each_picture_alone(monkeypatch, chunk):
    """A batch (in parts of two pictures when their float64 pixels pass the chunk size:
    large pictures on a small GPU) gives each picture's own resize."""
    if chunk:
        monkeypatch.setattr(R, "CHUNK_BYTES", chunk)
    rng = np.random.default_rng(6)
    batch = rng.integers(0, 256, (5, 3, 50, 70), dtype=np.uint8)
    R.resize(torch.from_numpy(batch[:1]), (33, 47), "bicubic")  # the pass order learnt first
    calls = []
    real = R._pass
    monkeypatch.setattr(R, "_pass", lambda y, *a: calls.append(y.shape[0]) or real(y, *a))
    got = R.resize(torch.from_numpy(batch), (33, 47), "bicubic")
    assert got.shape == (5, 3, 33, 47)
    for i in range(5):
        assert np.array_equal(_array(got[i]), _pillow(batch[i].transpose(1, 2, 0), (33, 47), "bicubic"))
    assert calls == ([2, 2, 2, 2, 1, 1] if chunk else [5, 5])


def test_a_pillow_these_passes_cannot_reproduce_is_run_itself(monkeypatch):
    """When neither pass order reproduces the installed Pillow for a size pair (a future
    Pillow with other arithmetic), those sizes are resized by Pillow: never other pixels."""
    real = R._resize
    monkeypatch.setattr(R, "_resize", lambda *a: real(*a) ^ 1)  # every order is off by one
    monkeypatch.setattr(R, "_ORDERS", {})
    a = np.random.default_rng(7).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    for _ in range(2):
        got = R.resize(_tensor(a), (30, 50), "bicubic", (2, 3, 20, 40))
        assert np.array_equal(_array(got), _pillow(a, (30, 50), "bicubic")[2:22, 3:43])
        assert R.pass_order(40, 60, 30, 50, "bicubic", 3) is None


def test_pass_order_is_learnt_per_size_from_pillow_then_reused(monkeypatch):
    monkeypatch.setattr(R, "_ORDERS", {})
    assert R.pass_order(50, 60, 50, 30, "bicubic", 3) == "hv"  # one pass: nothing to learn
    assert R.pass_order(72, 172, 44, 228, "bicubic", 3) == "unknown"
    flat = np.full((72, 172, 3), 128, dtype=np.uint8)  # both orders agree on it: undecided
    R.resize(_tensor(flat), (44, 228), "bicubic")
    assert R.pass_order(72, 172, 44, 228, "bicubic", 3) == "unknown"
    a = np.random.default_rng(9).integers(0, 256, (72, 172, 3), dtype=np.uint8)
    R.resize(_tensor(a), (44, 228), "bicubic")
    learnt = R.pass_order(72, 172, 44, 228, "bicubic", 3)
    assert learnt in ("hv", "vh")
    c = np.random.default_rng(15).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    R.resize(_tensor(c), (30, 20), "bicubic")
    assert R.pass_order(50, 40, 30, 20, "bicubic", 3) in ("hv", "vh") and R.pass_order(72, 172, 44, 228, "bicubic", 3) == learnt
    calls = []
    monkeypatch.setattr(R, "_with_pillow", lambda *a: calls.append(1))  # known now: Pillow not asked again
    b = np.random.default_rng(10).integers(0, 256, (72, 172, 3), dtype=np.uint8)
    assert np.array_equal(_array(R.resize(_tensor(b), (44, 228), "bicubic")), _pillow(b, (44, 228), "bicubic")) and not calls


def test_weights_are_pillows_fixed_point_and_refuse_bad_input():
    m = R.weights(10, 5, "bilinear")  # halving with the triangle filter: taps 1/8, 3/8, 3/8, 1/8 at 22 bits
    one = 1 << R.PRECISION_BITS
    assert m.shape == (5, 10) and m[1, 1:5].tolist() == [one / 8, 3 * one / 8, 3 * one / 8, one / 8]
    assert m[0, :3].tolist() == [round(3 / 7 * one), round(3 / 7 * one), round(1 / 7 * one)]  # the edge, renormalized
    with pytest.raises(ValueError, match="filter"):
        R.weights(10, 5, "nearest")
    with pytest.raises(ValueError, match="cannot resample"):
        R.weights(10, 0, "bicubic")


def test_grey_is_pillows_convert_L_for_every_colour():
    """All 2**24 RGB colours (one 4096 x 4096 picture): a weight or the rounding off by one
    shows on some of them."""
    v = np.arange(1 << 24, dtype=np.uint32)
    a = np.stack([v >> 16, (v >> 8) & 255, v & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
    g = R.grey(_tensor(a))
    assert g.shape == (1, 4096, 4096) and np.array_equal(g[0].numpy(), np.asarray(Image.fromarray(a).convert("L")))


def test_upload_groups_pictures_by_size_and_keeps_their_places():
    ims = [Image.new("RGB", (30, 20), (i, 0, 0)) if i % 2 else Image.new("RGB", (10, 40), (i, 0, 0)) for i in range(5)]
    groups = R.upload(ims, "cpu")
    assert sorted(i for idx, _ in groups for i in idx) == list(range(5))
    for idx, t in groups:
        assert t.dtype == torch.uint8 and t.shape[0] == len(idx)
        for j, i in enumerate(idx):
            assert torch.equal(t[j], torch.from_numpy(np.asarray(ims[i]).copy()).permute(2, 0, 1))


@pytest.mark.parametrize("kind", ["bicubic", "lanczos"])
def test_each_pass_order_is_pillows_two_one_pass_resizes(kind):
    """"hv" is Pillow's horizontal resize, then its vertical one, each rounded to 8 bits
    (two one-pass Pillow resizes), and "vh" the other way round: the orders' names mean
    what `pass_order` says Pillow does."""
    a = np.random.default_rng(16).integers(0, 256, (72, 172, 3), dtype=np.uint8)
    full = (0, 0, 44, 228)
    hv = _array(R._resize(_tensor(a), (44, 228), kind, "hv", full))
    vh = _array(R._resize(_tensor(a), (44, 228), kind, "vh", full))
    assert np.array_equal(hv, _pillow(_pillow(a, (72, 228), kind), (44, 228), kind))
    assert np.array_equal(vh, _pillow(_pillow(a, (44, 172), kind), (44, 228), kind))
    assert not np.array_equal(hv, vh)
