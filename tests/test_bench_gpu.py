"""bench/gpu.sh without a GPU: its tiny CPU mode runs the same code paths as the GPU run
(score stage vs forward-only, MUMU through the family code, the VD step, FLOP counting,
MFU, peak memory) and prints every field the README's GPU figures come from."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = r"([0-9]+(?:\.[0-9]+)?)"


@pytest.mark.slow  # about a minute on 2 idle cores, several on a loaded machine
def test_gpu_benchmark_tiny_mode_prints_every_figure(tiny_cache):
    # CUDA hidden, so the script takes its no-GPU branch even on a GPU machine
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--peak-tflops", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = p.stdout
    assert p.returncode == 0, p.stderr[-3000:]
    assert "no GPU here" in out and "tiny models" in out and "peak 1 TFLOP/s (--peak-tflops)" in out

    score = [line for line in out.splitlines() if line.startswith("[score]")]
    assert len(score) == 1, out
    stage = float(re.search(rf"stage {NUM} images/s", score[0]).group(1))
    forward = float(re.search(rf"forward-only {NUM} images/s", score[0]).group(1))
    frac = float(re.search(rf"fraction {NUM}%", score[0]).group(1))
    assert stage > 0 and forward > 0
    assert abs(frac - 100 * stage / forward) < 0.01 * frac + 0.1
    assert "image tower alone on ready tensors" in score[0] and "peak memory" in score[0]

    train = {tuple(re.match(r"\[train\] (\w+) (\w+):", line).groups()): line
             for line in out.splitlines() if line.startswith("[train]")}
    assert set(train) == {("mumu", "sd15"), ("mumu", "sdxl"), ("vd", "sd15"), ("vd", "sdxl")}, out
    for (family, _size), line in train.items():
        ips = float(re.search(rf"{NUM} samples/s", line).group(1))
        gflop = float(re.search(rf"{NUM} GFLOP/sample", line).group(1))
        mfu = float(re.search(rf"MFU {NUM}% of 1 TFLOP/s", line).group(1))
        assert ips > 0 and gflop > 0
        # MFU is the measured throughput times the counted FLOPs over the peak given
        assert abs(mfu - 100 * gflop * 1e9 * ips / 1e12) <= 0.05 * mfu + 0.2, line
        assert "FlopCounterMode" in line and "peak memory" in line and "(SDPA)" in line
        assert ("family code path (train/families/mumu.py" in line) == (family == "mumu")
        assert ("plain UNet forward and backward" in line) == (family == "vd")
    assert re.search(r"\[gpu\] done in \d+ s", out)
