"""bench/score.py and bench/ground.py run end to end in their tiny settings and print the
fraction the README's performance table quotes (bench/ground.py's stage part once wrote
its selection where the stage no longer reads it, and nothing noticed)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = r"([0-9]+(?:\.[0-9]+)?)"


def bench(script: str, *args: str) -> str:
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--device", "cpu", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def fractions(out: str) -> tuple[float, float, float, float]:
    forward = float(re.search(rf"forward passes alone \(prepared batches\)\s+{NUM} images/s", out).group(1))
    serial = float(re.search(rf"stage, serial \(no prefetch\)\s+{NUM} images/s", out).group(1))
    m = re.search(rf"with prefetch {NUM}%, serial {NUM}%", out)
    return forward, serial, float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("script,args,what", [
    ("score.py", ["--parts", "stage", "--stage-clip", "tiny", "--stage-images", "8", "--batch-size", "4", "--rounds", "1"], "CLIP tiny"),
    ("ground.py", ["--parts", "stage", "--stage-sizes", "tiny", "--images", "4", "--stage-images", "4", "--batch-size", "2",
                   "--rounds", "1", "--heads", "none"], "no head boxes"),
])
def test_stage_benchmark_prints_its_fraction(script, args, what):
    out = bench(script, *args)
    assert what in out
    forward, serial, _frac, frac_serial = fractions(out)
    assert forward > 0 and serial > 0
    # the fraction is the two rates' ratio, up to the printed rounding (rates to 0.005, the fraction to 0.05 points)
    assert abs(frac_serial - 100 * serial / forward) <= 0.05 + frac_serial * (0.005 / serial + 0.005 / forward) + 1e-9


def test_download_benchmark_breakdown_prints_each_part():
    """`bench/download.py --breakdown`, which the README's download row quotes: a shard in
    process at 64 and 8 threads, the fetch alone, and each part of the resize path by format
    (the JPEGs' decode DCT-scaled where they shrink 2x or more)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "download.py"), "--images", "24", "--rounds", "0",
                        "--fixed-images", "0", "--breakdown"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    shard = re.search(rf"one shard of 24 URLs in this process \(download_shard, no Ray\): 64 threads {NUM} ms, 8 threads {NUM} ms", out)
    fetch = re.search(rf"HTTP fetch alone, one URL after another: {NUM} ms user \+ {NUM} ms system per URL", out)
    assert shard and fetch and float(shard.group(1)) > 0 and float(shard.group(2)) > 0 and float(fetch.group(1)) > 0
    for fmt in ("jpg", "png", "webp"):
        m = re.search(rf"{fmt} \((\d+) images x 5\): header {NUM}, decode {NUM}, resize {NUM}, encode {NUM} ms", out)
        assert m and int(m.group(1)) > 0 and all(float(g) > 0 for g in m.groups()[2:])
    whole = re.search(r"\(the decode DCT-scaled; (\d+) of 42 too small to shrink 2x, decoded whole\)", out)
    assert whole and 0 < int(whole.group(1)) < 42  # the pool has JPEGs on both sides of 2x
