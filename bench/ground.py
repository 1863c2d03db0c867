"""Benchmark: images/s of grounding with batching on and off.

Both runs use our `GroundingDino` wrapper on the same images and captions (each image
its own caption); "off" is batch size 1, the way per-image grounding scripts run it.
Weights are random (none can be downloaded here): throughput does not depend on them.

    python bench/ground.py                          # CPU, tiny model and the real grounding-dino-tiny architecture
    python bench/ground.py --device cuda --batch-size 32 --images 256    # GPU mode
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import torch
from PIL import Image


def main() -> None:
    from mmloom.testkit.demo_data import demo_images
    from mmloom.filters.grounding import GroundingDino
    from mmloom.testkit.tiny_scoring import make_grounding_dino

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sizes", default="tiny,grounding-dino-tiny")
    a = ap.parse_args()
    pool = demo_images()
    ims, caps = [], []
    for i in range(a.images):
        _n, data, cap, _w, _h = pool[i % len(pool)]
        im = Image.open(io.BytesIO(data)).convert("RGB")
        scale = 512 / min(im.size)
        ims.append(im.resize((round(im.width * scale), round(im.height * scale))))
        caps.append(cap)
    order = sorted(range(len(ims)), key=lambda i: ims[i].width / ims[i].height)  # as the ground stage batches
    ims, caps = [ims[i] for i in order], [caps[i] for i in order]
    words = sorted({w for c in caps for w in c.split()})
    print(f"device {a.device}, {a.images} images (shorter side 512), batch {a.batch_size} vs 1")
    for size in a.sizes.split(","):
        with tempfile.TemporaryDirectory() as d:
            make_grounding_dino(d, words, full_size=size != "tiny")
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


if __name__ == "__main__":
    main()
