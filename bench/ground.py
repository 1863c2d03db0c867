"""Benchmark: images/s of grounding with batching on and off, and of the ground stage
against the detector's forward passes alone.

Batching: both runs use our `GroundingDino` wrapper on the same images and captions
(each image its own caption); "off" is batch size 1, the way per-image grounding scripts
run it. Stage: a committed download shard and a committed selection are grounded by
`curate.ground.GroundWorker.run` (read and sha256-check the tar, decode, processor,
model, output decoding, head boxes, parquet, commit) and, in the same run, the same
batches, decoded and run through the processor beforehand, go through the detector alone
(`GroundingDino.detect` on `GroundingDino.prepare`d batches). Stage images/s over
forward-only images/s is the fraction. Each of --rounds rounds measures forward-only, the
stage and the stage without prefetch one after the other; each figure is its best round
(other processes on a shared machine only ever slow a run down).
Weights are random (none can be downloaded here): throughput does not depend on them.

    python bench/ground.py                          # CPU, tiny model and the real grounding-dino-tiny architecture
    python bench/ground.py --parts stage --sizes grounding-dino-tiny --stage-images 8   # the stage at real size
    python bench/ground.py --device cuda --batch-size 32 --images 256    # GPU mode
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def demo(n: int, side: int = 512):
    from mmloom.testkit.demo_data import demo_images

    pool = demo_images()
    ims, caps = [], []
    for i in range(n):
        _n, data, cap, _w, _h = pool[i % len(pool)]
        im = Image.open(io.BytesIO(data)).convert("RGB")
        scale = side / min(im.size)
        ims.append(im.resize((round(im.width * scale), round(im.height * scale))))
        caps.append(cap)
    return ims, caps


def batching(a, size: str, d: str, ims, caps) -> None:
    from mmloom.filters.grounding import GroundingDino

    order = sorted(range(len(ims)), key=lambda i: ims[i].width / ims[i].height)  # as the ground stage batches
    ims, caps = [ims[i] for i in order], [caps[i] for i in order]
    g = GroundingDino(d, 0.35, 0.25, a.device)
    rates = {}
    for bs in (a.batch_size, 1):
        g.detect(ims[:bs], caps[:bs])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(ims), bs):
            g.detect(ims[i:i + bs], caps[i:i + bs])
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        rates[bs] = len(ims) / (time.perf_counter() - t)
    print(f"  {size:<22} batched {rates[a.batch_size]:7.2f} images/s   unbatched {rates[1]:7.2f} images/s   "
          f"ratio {rates[a.batch_size] / rates[1]:.2f}")


def write_selection(root: str, keys: list[str], caps: list[str], sizes: list[tuple[int, int]], shard: int = 0) -> None:
    """A committed selection (manifests.schemas.SELECTED_FILE) naming the shard's samples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmloom.manifests import schemas as S
    from mmloom.manifests.store import ShardStore

    store = ShardStore(root)
    staging = store.staging_dir("select", 0)
    path = os.path.join(staging, "selected.parquet")
    pq.write_table(pa.table({
        "sample_key": [f"s{shard}-{i}" for i in range(len(keys))], "key": keys, "shard": pa.array([shard] * len(keys), pa.int32()),
        "clean_caption": caps, "width": pa.array([w for w, _ in sizes], pa.int32()), "height": pa.array([h for _, h in sizes], pa.int32()),
    }), path)
    store.commit("select", 0, {S.SELECTED_FILE: path}, {"rows": len(keys)}, "bench")
    store.discard(staging)


def stage_vs_forward(model_dir: str, ims, caps, batch_size: int, device: str, rounds: int, heads: str = "face") -> dict:
    from score import best_of_rounds, jpegs, write_download_shard

    from mmloom.curate.download import key_for
    from mmloom.curate.ground import GroundWorker
    from mmloom.manifests.store import ShardStore

    n = len(ims)
    w = GroundWorker({"model": model_dir, "batch_size": batch_size, "device": device, "head_source": heads})
    sync = torch.cuda.synchronize if w.dino.device.startswith("cuda") else (lambda: None)
    with tempfile.TemporaryDirectory() as root:
        blobs = jpegs(ims)
        write_download_shard(root, blobs, caps)
        keys = [key_for(i, 0, n) for i in range(n)]
        write_selection(root, keys, caps, [im.size for im in ims])
        store = ShardStore(root)
        order = sorted(range(n), key=lambda i: (ims[i].width / ims[i].height, keys[i]))  # as the stage batches
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        decoded = [[Image.open(io.BytesIO(blobs[i])).convert("RGB") for i in b] for b in batches]
        ready = [(im, [caps[i] for i in b], w.dino.prepare(im, [caps[i] for i in b])) for b, im in zip(batches, decoded)]
        boxes = sum(len(d) for im, c, p in ready for d in w.dino.detect(im, c, p)) / n  # and the warm-up

        def forward():
            sync()
            t = time.perf_counter()
            for im, c, p in ready:
                w.dino.detect(im, c, p)
            sync()
            return n / (time.perf_counter() - t)

        def stage(prefetch):
            store.uncommit("ground", 0)
            t = time.perf_counter()
            w.run(0, root, "bench", "jpg", prefetch=prefetch)
            sync()
            return n / (time.perf_counter() - t)

        out = best_of_rounds(forward, stage, w.dino.device, rounds)
        t = time.perf_counter()
        for b in batches:
            im = [Image.open(io.BytesIO(blobs[i])).convert("RGB") for i in b]
            w.dino.prepare(im, [caps[i] for i in b])
        prep_ms = (time.perf_counter() - t) / n * 1e3
    return {**out, "prep_ms": prep_ms, "boxes": boxes}


def main() -> None:
    from score import stage_args

    from mmloom.testkit.tiny_scoring import make_grounding_dino

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    stage_args(ap, 64)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sizes", default="tiny,grounding-dino-tiny")
    ap.add_argument("--parts", default="batching,stage", help="batching (batched vs unbatched), stage (stage vs forward passes)")
    ap.add_argument("--stage-sizes", default="tiny", help="model sizes measured in the stage part")
    ap.add_argument("--heads", default="face", choices=["face", "detector", "none"], help="the stage's ground.head_source")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    ims, caps = demo(max(a.images, a.stage_images))
    words = sorted({w for c in caps for w in c.split()} | {w for c in caps for w in c.lower().split()})
    print(f"device {a.device}, images with shorter side 512, batch {a.batch_size}")
    sizes = a.sizes.split(",") if "batching" in parts else []
    stage_sizes = a.stage_sizes.split(",") if "stage" in parts else []
    for size in dict.fromkeys(sizes + stage_sizes):
        with tempfile.TemporaryDirectory() as d:
            make_grounding_dino(d, words, full_size=size != "tiny")
            if size in sizes:
                batching(a, size, d, ims[:a.images], caps[:a.images])
            if size in stage_sizes:
                r = stage_vs_forward(d, ims[:a.stage_images], caps[:a.stage_images], a.batch_size, a.device, a.rounds, a.heads)
                heads = {"face": "OpenCV head boxes", "detector": "head boxes from the detector", "none": "no head boxes"}[a.heads]
                print(f"  {size}: ground stage on a committed shard ({a.stage_images} images, batch {a.batch_size}, {heads}):")
                print(f"    detector's forward passes alone (prepared batches)  {r['forward']:8.2f} images/s")
                print(f"    stage, {r['threads']} prefetch thread(s)                      {r['stage']:8.2f} images/s")
                print(f"    stage, serial (no prefetch)                         {r['serial']:8.2f} images/s")
                print(f"    decode + processor alone, one thread: {r['prep_ms']:.1f} ms/image; boxes found per image {r['boxes']:.1f} "
                      "(random weights: a trained detector finds a few)")
                default = f"{r['default']} prefetch thread(s)" if r["default"] else "serial"
                print(f"  fraction of forward-only throughput (best of {a.rounds} rounds each): with prefetch {r['frac']:.1%}, "
                      f"serial {r['frac_serial']:.1%}; the stage's default on {a.device}: {default}")


if __name__ == "__main__":
    main()
