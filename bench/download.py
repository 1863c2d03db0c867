"""Benchmark: mmloom's download stage vs the plain img2dataset command, same inputs.

Serves N images (default 2000) from a local HTTP server in its own process, writes one
LAION-format metadata parquet, then in one run:
  1. `img2dataset` (its own CLI, multiprocessing distributor) on that parquet;
  2. `mmloom ingest` (not timed) then `mmloom download` (Ray) on the same parquet;
with the same image size, resize mode, processes/threads, shard size and hashing.
Both are timed as whole commands (start-up included) and the ratio of images/s is
printed: ours / img2dataset (>= 1.0 means we are not slower).

    python bench/download.py --images 2000
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pandas as pd


def serve(n: int, q) -> None:
    from PIL import Image

    from mmloom.testkit.demo_data import demo_images, jpeg_bytes
    from mmloom.testkit.localserver import LocalServer, Route

    import io

    pool = []
    for _name, data, _c, _w, _h in demo_images():
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img.thumbnail((640, 640))
        pool.append(jpeg_bytes(img, 90))
    routes = {f"/img/{i}.jpg": Route(pool[i % len(pool)]) for i in range(n)}
    with LocalServer(routes) as srv:
        q.put(srv.base)
        while True:
            time.sleep(3600)


def count_success(folder: str) -> int:
    n = 0
    for p in glob.glob(os.path.join(folder, "*.parquet")):
        df = pd.read_parquet(p, columns=["status"])
        n += int((df.status == "success").sum())
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()

    work = a.workdir or tempfile.mkdtemp(prefix="mmloom-bench-dl-")
    q = mp.get_context("spawn").Queue()
    server = mp.get_context("spawn").Process(target=serve, args=(a.images, q), daemon=True)
    server.start()
    base = q.get(timeout=120)
    meta = os.path.join(work, "meta.parquet")
    pd.DataFrame({
        "URL": [f"{base}/img/{i}.jpg" for i in range(a.images)],
        "TEXT": [f"benchmark image {i}" for i in range(a.images)],
        "WIDTH": 640, "HEIGHT": 480, "similarity": 0.35, "punsafe": 0.0, "pwatermark": 0.0,
    }).to_parquet(meta, index=False)
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    results = {}
    try:
        # 1. the plain img2dataset command
        out = os.path.join(work, "i2d")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [os.path.join(bindir, "img2dataset"), "--url_list", meta, "--input_format", "parquet",
               "--url_col", "URL", "--caption_col", "TEXT", "--output_format", "webdataset",
               "--output_folder", out, "--processes_count", str(a.processes), "--thread_count", str(a.threads),
               "--image_size", str(a.image_size), "--resize_mode", "keep_ratio",
               "--number_sample_per_shard", str(a.shard_size), "--extract_exif", "False",
               "--compute_hash", "sha256", "--timeout", "10", "--enable_wandb", "False"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results["img2dataset"] = (time.perf_counter() - t, count_success(out))

        # 2. mmloom: ingest (untimed), then the download command
        ds = os.path.join(work, "mmloom")
        shutil.rmtree(ds, ignore_errors=True)
        mm = os.path.join(bindir, "mmloom")
        subprocess.run([mm, "ingest", meta, "--out", ds, "--shard-size", str(a.shard_size), "--no-progress"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        cfg = os.path.join(work, "bench.yaml")
        with open(cfg, "w") as f:
            f.write(f"ingest:\n  shard_size: {a.shard_size}\ndownload:\n  image_size: {a.image_size}\n"
                    f"  resize_mode: keep_ratio\n  thread_count: {a.threads}\n  timeout: 10\n"
                    f"  allow_private_addresses: true\n  cpus_per_shard: {(os.cpu_count() or 2) / a.processes}\n")
        t = time.perf_counter()
        subprocess.run([mm, "download", ds, "--config", cfg, "--no-progress"], check=True, env=env, stdout=subprocess.DEVNULL)
        results["mmloom"] = (time.perf_counter() - t, count_success(os.path.join(ds, "images")))
    finally:
        server.terminate()

    print(f"{a.images} images, {a.processes} processes x {a.threads} threads, image_size {a.image_size}, shard size {a.shard_size}")
    for name, (secs, ok) in results.items():
        print(f"  {name:<12} {ok:>6} ok in {secs:7.1f} s  = {ok / secs:8.1f} images/s")
    ratio = (results["mmloom"][1] / results["mmloom"][0]) / (results["img2dataset"][1] / results["img2dataset"][0])
    print(f"ratio mmloom / img2dataset: {ratio:.2f}")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
