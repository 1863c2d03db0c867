"""FID / KID in `mmloom eval` (train/fid.py): torchmetrics on torch-fidelity's Inception,
with weights the user supplies, read safely. Random weights in the real layout: these
test the plumbing and the guards, not the numbers' meaning."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmloom.errors import UserError
from mmloom.testkit.toyworld import render_scene
from mmloom.train.fid import STANDARD_NAME, describe, fid_kid, find_inception, fid_note, load_inception


def _toys(seeds, size=32):
    return [render_scene(s, size=2 * size).image.resize((size, size)) for s in seeds]


def test_fid_and_kid_are_zero_for_the_same_pictures_and_grow_for_other_ones(random_inception):
    real = _toys(range(12))
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(12)]
    r = fid_kid(real, {"same": real, "other toys": _toys(range(100, 112)), "noise": noise}, random_inception)
    assert not r["standard"] and len(r["sha256"]) == 64 and r["real"] == 12
    assert abs(r["same"]["fid"]) < 1e-2, r["same"]  # KID is unbiased: on the same pictures it is a little below 0
    assert r["noise"]["fid"] > r["other toys"]["fid"] > r["same"]["fid"] + 1e-3, r
    assert r["noise"]["kid"] > r["other toys"]["kid"] > r["same"]["kid"], r
    line = describe(r)
    assert "NOT the standard" in line and "noise" in line


def test_other_state_dicts_are_a_clear_error(tmp_path):
    import torch

    other = tmp_path / "not-inception.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="not torch-fidelity's InceptionV3"):
        load_inception(str(other))


def test_without_weights_eval_says_so_and_a_wrong_path_fails_at_once(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert find_inception() is None
    assert "--inception" in fid_note() and "never downloads" in fid_note()
    cached = tmp_path / "hub" / "checkpoints" / STANDARD_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception() == str(cached)  # where torchmetrics' own download would have put it
    with pytest.raises(UserError, match="no such file"):
        find_inception(str(tmp_path / "missing.pth"))
