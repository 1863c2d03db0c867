"""Benchmark: images/s of each scoring model, of the whole score set against the naive
way (every head running its own CLIP pass, one image at a time), and of the score stage
against the models' forward passes alone.

    python bench/score.py                       # CPU: tiny models + real-architecture CLIPs
    python bench/score.py --parts stage --stage-clip ViT-B-32   # the stage fraction with a real-size CLIP
    python bench/score.py --device cuda --batch-size 256 --precision bf16   # H100 mode

Weights are random (none can be downloaded here); throughput does not depend on them.
ViT-B-32 and ViT-L-14 are open_clip's real architectures built without weights.

The stage fraction: a committed download shard (256 px JPEGs, as the download stage
leaves them) is scored by `curate.score.score_shard` (read and sha256-check the tar,
decode, preprocess, models, parquet, commit) and, in the same run, the same batches,
decoded and preprocessed beforehand, go through the models alone (`ScoreSet.score` on
`ScoreSet.prepare`d batches: forward passes, heads, output decoding). Stage images/s over
forward-only images/s is the fraction. Each of --rounds rounds measures forward-only, the
stage and the stage without prefetch one after the other; each figure is its best round
(other processes on a shared machine only ever slow a run down).
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


def _decode(data: bytes):
    """A shard image decoded as the score stage decodes it (`mmloom.imageguard.decode_rgb`,
    looked up at each call: `bench/gpu.py --decode pil` swaps it)."""
    from mmloom import imageguard
    from mmloom.curate.score import DEFAULT_MAX_PIXELS

    return imageguard.decode_rgb(data, DEFAULT_MAX_PIXELS)


def jpegs(ims) -> list[bytes]:
    out = []
    for im in ims:
        b = io.BytesIO()
        im.save(b, "JPEG", quality=95)
        out.append(b.getvalue())
    return out


def write_download_shard(root: str, blobs: list[bytes], captions: list[str], shard: int = 0) -> None:
    """A committed download shard in the download stage's format (tar of KEY.jpg + status
    parquet + completion record with each file's sha256), written through the store."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmloom.curate.download import STATUS_SCHEMA, key_for
    from mmloom.manifests import schemas as S
    from mmloom.manifests.store import ShardStore, shard_name

    store = ShardStore(root)
    staging = store.staging_dir("images", shard)
    tar_path, pq_path = os.path.join(staging, "s.tar"), os.path.join(staging, "s.parquet")
    rows = []
    with tarfile.open(tar_path, "w") as t:
        for i, (data, cap) in enumerate(zip(blobs, captions)):
            key = key_for(i, shard, len(blobs))
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
            w, h = Image.open(io.BytesIO(data)).size
            rows.append({"sample_key": f"s{shard}-{i}", "key": key, "url": f"http://example.invalid/{i}.jpg", "caption": cap,
                         "status": S.SUCCESS, "error_message": None, "width": w, "height": h,
                         "original_width": w * 2, "original_height": h * 2, "sha256": None})
    pq.write_table(pa.Table.from_pylist(rows, schema=STATUS_SCHEMA), pq_path)
    base = f"images/{shard_name(shard)}"
    store.commit("download", shard, {base + ".tar": tar_path, base + ".parquet": pq_path}, {"rows": len(rows)}, "bench")
    store.discard(staging)


def score_models(root: str, clip: str = "tiny") -> dict:
    """The demo's score set (tiny CLIP, tiny timm watermark, aesthetic head, nudenet,
    OpenCV faces, phash); ``clip`` an open_clip architecture (ViT-B-32, ViT-L-14) puts
    that real-size CLIP, random weights, in place of the tiny one (aesthetic head resized)."""
    import json

    from mmloom.filters.aesthetic import save_aesthetic_head
    from mmloom.testkit.tiny_scoring import make_score_models

    cfg = make_score_models(root)
    if clip != "tiny":
        import open_clip

        d = os.path.join(root, f"clip-{clip}")
        os.makedirs(d, exist_ok=True)
        model_cfg = open_clip.get_model_config(clip)
        torch.manual_seed(0)
        torch.save(open_clip.create_model(clip, pretrained=None).state_dict(), os.path.join(d, "open_clip_pytorch_model.bin"))
        with open(os.path.join(d, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": model_cfg, "preprocess_cfg": {
                "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}, f)
        save_aesthetic_head(os.path.join(root, "aesthetic-head.pth"), in_dim=model_cfg["embed_dim"])
        cfg["clip"]["model"] = cfg["aesthetic"]["clip_model"] = d
    return cfg


def stage_vs_forward(cfg: dict, n: int, rounds: int, echo=print, sweep: tuple[int, ...] = (),
                     cpu: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> dict:
    """Score-stage images/s on a committed shard vs the models alone on the same batches;
    ``sweep``: other prefetch thread counts, the stage timed once with each after the
    rounds (``best["sweep"]``: threads -> images/s); ``cpu``: (threads, processes) for
    `cpu_scaling`, run first."""
    from mmloom.curate.config import ScoreConfig
    from mmloom.curate.score import score_shard
    from mmloom.filters.scoring import ScoreSet
    from mmloom.manifests.store import ShardStore

    pool = images(n)
    caps = [c for _n, _d, c, *_ in __import__("mmloom.testkit.demo_data", fromlist=["x"]).demo_images()]
    caps = [caps[i % len(caps)] for i in range(n)]
    blobs = jpegs(pool)
    s = ScoreSet(ScoreConfig.model_validate(cfg))
    bs = s.cfg.batch_size
    sync = torch.cuda.synchronize if s.device.startswith("cuda") else (lambda: None)
    with tempfile.TemporaryDirectory() as root:
        write_download_shard(root, blobs, caps)
        store = ShardStore(root)
        if cpu is not None:
            cpu_scaling(s, blobs, caps, *cpu, echo=echo)
        ready = [s.prepare([_decode(b) for b in blobs[i:i + bs]], caps[i:i + bs]) for i in range(0, n, bs)]
        s.score(ready[0], caps[:bs])  # warm-up

        def forward():
            sync()
            t = time.perf_counter()
            for i, p in enumerate(ready):
                s.score(p, caps[i * bs:(i + 1) * bs])
            sync()
            return n / (time.perf_counter() - t)

        def stage(prefetch):
            store.uncommit("score", 0)
            t = time.perf_counter()
            score_shard(s, 0, root, "bench", "jpg", prefetch=prefetch)
            sync()
            return n / (time.perf_counter() - t)

        best = best_of_rounds(forward, stage, s.device, rounds, echo)
        best["same_pixels"] = same_pixels(s, pool[:64], blobs[:512])
        best["sweep"] = {k: stage(k) for k in sweep}
        # what the stage does besides the models, timed alone: one thread, and the stage's
        # worker threads (how fast the CPU side could feed the models)
        best["prep_ms"], best["cpu_side"] = cpu_side(s, blobs, caps, best["threads"])
    return best


def same_pixels(s, ims, blobs) -> bool | None:
    """Whether the pixels resized where the models run (`score.resize_on_device`) equal
    Pillow's, for CLIP's input and phash's grey 32x32, and the stage's decoding Pillow's on
    ``blobs`` (None: nothing resizes there)."""
    import numpy as np

    from mmloom.curate.score import DEFAULT_MAX_PIXELS
    from mmloom.filters.geometry import PHash, phashes
    from mmloom.imageguard import open_image
    from mmloom.pil_resample import upload

    embs = [e for e in s.embedders.values() if e.resize_on_device]
    ph = [p for p in s.scorers if isinstance(p, PHash) and p.device is not None]
    if not embs and not ph:
        return None
    same = True
    for e in embs:
        on_device = e.pixels(ims).cpu()
        e.resize_on_device = False
        try:
            same &= torch.equal(on_device, e.pixels(ims).cpu())
        finally:
            e.resize_on_device = True
    for p in ph:
        same &= phashes(ims, upload(ims, p.device)) == phashes(ims)
    same &= all(np.array_equal(np.asarray(_decode(b)), np.asarray(open_image(b, DEFAULT_MAX_PIXELS))) for b in blobs)
    return bool(same)


def prepare_rate(s, blobs: list[bytes], caps: list[str], threads: int) -> float:
    """Images/s of decode + `ScoreSet.prepare` alone, no model, with ``threads`` worker
    threads as the stage runs them (`curate.score.ahead`; 0: in turn, one thread)."""
    from mmloom.curate.score import ahead

    bs, n = s.cfg.batch_size, len(blobs)

    def prep(i):
        return s.prepare([_decode(b) for b in blobs[i:i + bs]], caps[i:i + bs])

    t = time.perf_counter()
    for _ in ahead(prep, list(range(0, n, bs)), threads):
        pass
    return n / (time.perf_counter() - t)


def cpu_side(s, blobs: list[bytes], caps: list[str], threads: int) -> tuple[float, float]:
    """The stage's CPU side alone: ms per image on one thread, and images/s with
    ``threads`` worker threads."""
    return 1e3 / prepare_rate(s, blobs, caps, 0), prepare_rate(s, blobs, caps, threads)


def cpu_scaling(s, blobs: list[bytes], caps: list[str], threads: tuple[int, ...], procs: tuple[int, ...], echo=print) -> None:
    """The score stage's CPU side alone (decode and `ScoreSet.prepare`, no model), to see
    what feeds the models: each step's ms per image on one thread, images/s with worker
    threads (as the stage runs them) and with worker processes (what a process pool would
    give: decode, open_clip's PIL steps, phash, geometry and caption cleaning per batch,
    the pixels sent back to this process)."""
    import multiprocessing as mp

    from mmloom.filters.captions import clean_caption
    from mmloom.filters.geometry import geometry, phashes

    bs, n = s.cfg.batch_size, len(blobs)
    ims = [_decode(b) for b in blobs]
    emb = next(iter(s.embedders.values()))
    steps = {"decode": lambda: [_decode(b) for b in blobs], ("clip pixels (resized on the GPU)" if emb.resize_on_device else "clip pixels"): lambda: emb.pixels(ims),
             "phash": lambda: phashes(ims), "geometry": lambda: [geometry(im) for im in ims],
             "captions": lambda: [clean_caption(c) for c in caps]}
    sync = torch.cuda.synchronize if s.device.startswith("cuda") else (lambda: None)
    parts = []
    for name, f in steps.items():
        t = time.perf_counter()
        f()
        sync()
        parts.append(f"{name} {(time.perf_counter() - t) / n * 1e3:.2f}")
    echo(f"[cpu] one thread, ms per image: {', '.join(parts)}")
    for k in threads:
        echo(f"[cpu] decode + prepare with {k} worker thread(s): {prepare_rate(s, blobs, caps, k):.1f} images/s")
    pil_steps = emb._split[0] if emb._split is not None else None
    if pil_steps is None or not procs:
        return
    ctx = mp.get_context("spawn")
    for k in procs:
        with ctx.Pool(k, initializer=_proc_init, initargs=(pil_steps,)) as pool:
            pool.map(_proc_batch, [[blobs[0]]] * k)  # every worker started and warm
            t = time.perf_counter()
            got = sum(len(x) for x in pool.imap(_proc_batch, [(blobs[i:i + bs], caps[i:i + bs]) for i in range(0, n, bs)]))
            echo(f"[cpu] decode + pixels + phash + geometry + captions in {k} worker process(es): "
                 f"{got / (time.perf_counter() - t):.1f} images/s")


_PIL_STEPS = None


def _proc_init(pil_steps) -> None:
    global _PIL_STEPS
    _PIL_STEPS = pil_steps


def _proc_batch(item):
    import numpy as np

    from mmloom.filters.captions import clean_caption
    from mmloom.filters.geometry import geometry, phashes

    if isinstance(item, list):  # warm-up
        return []
    blobs, caps = item
    ims = [_decode(b) for b in blobs]
    px = np.stack([np.asarray(_PIL_STEPS(im), dtype=np.uint8) for im in ims])
    return list(zip(px, phashes(ims), [geometry(im) for im in ims], [clean_caption(c) for c in caps]))


def best_of_rounds(forward, stage, device: str, rounds: int, echo=print) -> dict:
    """Forward-only, the stage with prefetch threads and the serial stage, in turn each
    round (a busy spell of other processes is seen by all three); the best of each (other
    processes only ever slow a run down) and the fractions."""
    from mmloom.curate.score import prefetch_threads

    default = prefetch_threads(device, None)
    k = max(1, default)  # the stage with worker threads, whatever the default
    runs = []
    for _ in range(rounds):
        f, st, se = forward(), stage(k), stage(0)
        runs.append({"forward": f, "stage": st, "serial": se})
        echo(f"    round {len(runs)}: forward-only {f:.2f}, stage with {k} prefetch thread(s) {st:.2f}, serial stage {se:.2f} images/s")
    best = {x: max(r[x] for r in runs) for x in ("forward", "stage", "serial")}
    best["frac"], best["frac_serial"] = best["stage"] / best["forward"], best["serial"] / best["forward"]
    best["threads"], best["default"] = k, default
    best["spread"] = [r["stage"] / r["forward"] for r in runs], [r["serial"] / r["forward"] for r in runs]
    return best


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


def stage_args(ap, images: int) -> None:
    """The options of a stage-vs-forward measurement (here and in bench/ground.py)."""
    ap.add_argument("--stage-images", type=int, default=images, help="images in the committed shard the stage works on")
    ap.add_argument("--rounds", type=int, default=3, help="forward-only, stage and serial stage measured in turn this many times; best of each")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--archs", default="ViT-B-32,ViT-L-14")
    ap.add_argument("--parts", default="models,naive,stage", help="any of models (each model alone), naive (score set vs the naive peer), stage (stage vs forward passes)")
    ap.add_argument("--stage-clip", default="tiny", help="CLIP in the stage's score set: tiny or an open_clip architecture (ViT-B-32, ViT-L-14)")
    stage_args(ap, 128)
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    dev = a.device
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.startswith('cuda') else os.cpu_count()} "
          f"{'' if dev.startswith('cuda') else 'cores'}), batch {a.batch_size}, {a.precision}, {a.images} images")
    rows = []
    ims = images(a.images) if parts & {"models", "naive"} else []
    if "models" in parts:
        rows += model_rows(a, ims)
    if "naive" in parts:
        ours, peer = naive_rows(a, ims)
        rows += [("score set, tiny models: ours (batched, one CLIP pass)", ours),
                 ("score set, tiny models: naive (per image, CLIP per head)", peer)]
    if rows:
        w = max(len(r[0]) for r in rows)
        for name, r in rows:
            print(f"  {name:<{w}}  {r:9.1f} images/s")
    if "naive" in parts:
        print(f"ratio ours / naive score set: {ours / peer:.2f}")
    if "stage" in parts:
        with tempfile.TemporaryDirectory() as d:
            cfg = {**score_models(d, a.stage_clip), "device": dev, "batch_size": a.batch_size, "precision": a.precision}
            r = stage_vs_forward(cfg, a.stage_images, a.rounds)
        print(f"score stage on a committed shard ({a.stage_images} images, batch {a.batch_size}, CLIP {a.stage_clip}, "
              f"nudenet, timm watermark, aesthetic, OpenCV faces, phash):")
        print(f"  models' forward passes alone (prepared batches)  {r['forward']:9.2f} images/s")
        print(f"  stage, {r['threads']} prefetch thread(s)                   {r['stage']:9.1f} images/s")
        print(f"  stage, serial (no prefetch)                      {r['serial']:9.2f} images/s")
        print(f"  decode + prepare alone, one thread: {r['prep_ms']:.2f} ms/image; with {r['threads']} worker thread(s): {r['cpu_side']:.1f} images/s")
        default = f"{r['default']} prefetch thread(s)" if r["default"] else "serial"
        print(f"fraction of forward-only throughput (best of {a.rounds} rounds each): with prefetch {r['frac']:.1%}, "
              f"serial {r['frac_serial']:.1%}; the stage's default on {dev}: {default}")


def model_rows(a, ims) -> list:
    dev = a.device
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
    from mmloom.filters.geometry import phashes
    from mmloom.filters.nsfw import NudeNet, NudeNetNsfw

    nn = NudeNet()
    rows.append(("nudenet NSFW (onnxruntime, CPU)", rate(NudeNetNsfw(nn), ims, a.batch_size)))
    rows.append(("OpenCV frontal-face cascade", rate(OpenCvFaces(), ims, a.batch_size)))
    rows.append(("phash (imagehash's 64-bit DCT hash, per batch)", rate(phashes, ims, a.batch_size)))
    return rows


def naive_rows(a, ims) -> tuple[float, float]:
    from mmloom.curate.config import ScoreConfig
    from mmloom.filters.aesthetic import AestheticScorer
    from mmloom.clip import ClipEmbedder
    from mmloom.filters.nsfw import ClipMlpNsfw
    from mmloom.filters.geometry import phash
    from mmloom.filters.scoring import ScoreSet
    from mmloom.testkit.tiny_scoring import make_score_models

    dev = a.device
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
    return ours, peer


if __name__ == "__main__":
    main()
