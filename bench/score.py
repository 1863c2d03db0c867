"""Benchmark: images/s of each scoring model, and of the whole score set against the
naive way (every head running its own CLIP pass, one image at a time).

    python bench/score.py                       # CPU: tiny models + real-architecture CLIPs
    python bench/score.py --device cuda --batch-size 256 --precision bf16   # H100 mode

Weights are random (none can be downloaded here); throughput does not depend on them.
ViT-B-32 and ViT-L-14 are open_clip's real architectures built without weights.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import torch
from PIL import Image


def images(n: int):
    from mmloom.testkit.demo_data import demo_images

    pool = []
    for _n, d, *_ in demo_images():  # as the download stage leaves them: shorter side 256
        im = Image.open(io.BytesIO(d)).convert("RGB")
        scale = 256 / min(im.size)
        pool.append(im.resize((round(im.width * scale), round(im.height * scale))))
    return [pool[i % len(pool)] for i in range(n)]


def rate(fn, items, batch: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn(items[:batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, len(items), batch):
        fn(items[i:i + batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(items) / (time.perf_counter() - t)


def clip_arch(arch: str, device: str, precision: str):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device, precision=precision)
    model.eval()

    @torch.no_grad()
    def enc(ims):
        x = torch.stack([preprocess(im) for im in ims]).to(device)
        if precision != "fp32":
            x = x.to(torch.bfloat16 if precision == "bf16" else torch.float16)
        return model.encode_image(x)

    @torch.no_grad()
    def enc_only(x):
        return model.encode_image(x)

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return enc, enc_only, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--archs", default="ViT-B-32,ViT-L-14")
    a = ap.parse_args()
    ims = images(a.images)
    dev = a.device
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.startswith('cuda') else os.cpu_count()} "
          f"{'' if dev.startswith('cuda') else 'cores'}), batch {a.batch_size}, {a.precision}, {a.images} images")
    rows = []
    for arch in a.archs.split(","):
        enc, enc_only, size = clip_arch(arch, dev, a.precision)
        rows.append((f"open_clip {arch} image tower (incl. preprocessing)", rate(enc, ims, a.batch_size)))
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
        x = torch.randn(a.batch_size, 3, size, size, device=dev, dtype=dtype)
        n = max(a.images, a.batch_size * 4)
        t0 = time.perf_counter()
        enc_only(x)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n // a.batch_size):
            enc_only(x)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append((f"open_clip {arch} image tower (tensors only)", (n // a.batch_size) * a.batch_size / (time.perf_counter() - t0)))
        del enc, enc_only

    from mmloom.filters.faces import OpenCvFaces
    from mmloom.filters.geometry import phash
    from mmloom.filters.nsfw import NudeNet, NudeNetNsfw

    nn = NudeNet()
    rows.append(("nudenet NSFW (onnxruntime, CPU)", rate(NudeNetNsfw(nn), ims, a.batch_size)))
    rows.append(("OpenCV frontal-face cascade", rate(OpenCvFaces(), ims, a.batch_size)))
    rows.append(("phash (imagehash)", rate(lambda b: [phash(i) for i in b], ims, a.batch_size)))

    from mmloom.clip import ClipEmbedder
    from mmloom.curate.config import ScoreConfig
    from mmloom.filters.aesthetic import AestheticScorer
    from mmloom.filters.nsfw import ClipMlpNsfw
    from mmloom.filters.scoring import ScoreSet
    from mmloom.testkit.tiny_scoring import make_score_models

    with tempfile.TemporaryDirectory() as d:
        cfg = make_score_models(d)
        cfg = {**cfg, "device": dev, "batch_size": a.batch_size,
               "nsfw": {"backend": "clip_mlp", "model": os.path.join(d, "nsfw-head.pt")}}
        s = ScoreSet(ScoreConfig.model_validate(cfg))
        caps = ["a photo"] * len(ims)
        ours = rate(lambda b: s.score(b, caps[: len(b)]), ims, a.batch_size)
        # the naive peer: each head loads and runs its own CLIP, one image at a time
        clip_a, clip_b = ClipEmbedder(cfg["clip"]["model"], dev), ClipEmbedder(cfg["clip"]["model"], dev)
        aest = AestheticScorer(cfg["aesthetic"]["head"], "x")
        nsfw = ClipMlpNsfw(os.path.join(d, "nsfw-head.pt"), "x")
        clip_c = ClipEmbedder(cfg["clip"]["model"], dev)

        def naive(b):
            for im in b:
                e = clip_a.images([im])
                (e * clip_a.texts(["a photo"])).sum(-1)
                aest(None, clip_b.images([im]))
                nsfw(None, clip_c.images([im]))
                s.watermark([im])
                s.faces([im])
                phash(im)

        peer = rate(naive, ims, a.batch_size)
    rows.append(("score set, tiny models: ours (batched, one CLIP pass)", ours))
    rows.append(("score set, tiny models: naive (per image, CLIP per head)", peer))
    w = max(len(r[0]) for r in rows)
    for name, r in rows:
        print(f"  {name:<{w}}  {r:9.1f} images/s")
    print(f"ratio ours / naive score set: {ours / peer:.2f}")


if __name__ == "__main__":
    main()
