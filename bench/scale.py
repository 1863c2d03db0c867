"""Benchmark: throughput of a CPU stage (download from a local server) on a Ray cluster
with one and with two worker nodes on this machine, and the ratio.

Each run starts a fresh head node plus N worker nodes (`ray start`, one CPU each), ingests
the same N_IMAGES urls, and times `mmloom download --ray-address` as a whole command.
The image server runs in its own process and answers each request after ``--delay``
seconds, as remote hosts do, so the stage is bound by waiting, not by this machine's 2 cores.

    python bench/scale.py --images 600
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pandas as pd


def serve(n: int, delay: float, q) -> None:
    import io

    from PIL import Image

    from mmloom.testkit.demo_data import demo_images, jpeg_bytes
    from mmloom.testkit.localserver import LocalServer, Route

    pool = []
    for _n, data, *_ in demo_images():
        im = Image.open(io.BytesIO(data)).convert("RGB")
        im.thumbnail((320, 320))
        pool.append(jpeg_bytes(im, 85))
    with LocalServer({f"/img/{i}.jpg": Route(pool[i % len(pool)], delay=delay) for i in range(n)}) as srv:
        q.put(srv.base)
        while True:
            time.sleep(3600)


def run(nodes: int, meta: str, work: str, threads: int) -> tuple[float, int]:
    from mmloom.testkit.local_cluster import LocalCluster

    ds = os.path.join(work, f"ds{nodes}")
    shutil.rmtree(ds, ignore_errors=True)
    mm = [sys.executable, "-m", "mmloom"]
    subprocess.run([*mm, "ingest", meta, "--out", ds, "--shard-size", "50", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    cluster = LocalCluster(workers=nodes, cpus_per_worker=1)
    try:
        t = time.perf_counter()
        subprocess.run([*mm, "download", ds, "--ray-address", cluster.address, "--allow-private-addresses",
                        "--thread-count", str(threads), "--image-size", "128", "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, **cluster.env})
        secs = time.perf_counter() - t
    finally:
        cluster.stop()
    ok = sum(int((pd.read_parquet(p, columns=["status"]).status == "success").sum())
             for p in sorted(__import__("glob").glob(os.path.join(ds, "images", "*.parquet"))))
    return secs, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--delay", type=float, default=0.05, help="seconds the server waits before each answer")
    ap.add_argument("--threads", type=int, default=8, help="download threads per shard task")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="mmloom-bench-scale-")
    q = mp.get_context("spawn").Queue()
    server = mp.get_context("spawn").Process(target=serve, args=(a.images, a.delay, q), daemon=True)
    server.start()
    base = q.get(timeout=120)
    meta = os.path.join(work, "meta.parquet")
    pd.DataFrame({"URL": [f"{base}/img/{i}.jpg" for i in range(a.images)], "TEXT": [f"image {i}" for i in range(a.images)],
                  "WIDTH": 320, "HEIGHT": 240}).to_parquet(meta, index=False)
    try:
        res = {n: run(n, meta, work, a.threads) for n in (1, 2)}
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{a.images} images, server delay {a.delay}s, shards of 50, {a.threads} threads per shard task")
    for n, (secs, ok) in res.items():
        print(f"  {n} worker node(s): {ok} ok in {secs:6.1f} s = {ok / secs:7.1f} images/s")
    print(f"ratio 2 nodes / 1 node: {(res[2][1] / res[2][0]) / (res[1][1] / res[1][0]):.2f}")


if __name__ == "__main__":
    main()
