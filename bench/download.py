"""Benchmark: mmloom's download stage vs the plain img2dataset command, same inputs, one run.

A local HTTP server in its own process serves N URLs (default 2000) over a pool of real
photos re-encoded at LAION-like sizes: longer side 400-2000 px, mostly JPEG (quality
75-95), some PNG and WebP, and a few failures (404s and truncated JPEGs). One LAION-format
metadata parquet lists them. Then, one after the other on the same machine:

  1. `img2dataset` started the way its users start it: its own CLI with its own defaults
     (processes, threads, shard size, EXIF extraction, timeout ...), given only what makes
     the output the same as mmloom's: the input columns, webdataset output, and mmloom's
     image size and resize mode (256 px, keep_ratio);
  2. `mmloom ingest` (not timed), then `mmloom download` (Ray in process) with mmloom's
     defaults, the address check off for the local server (`allow_private_addresses`,
     every other guard on) and shards of N / (2 x cores) rows so every core has work;
  3. the compute limit: the same decode and resize mmloom does (`make_resizer`: header
     check, DCT-scaled decode, resize, JPEG encode) in a tight loop over the same image
     bytes, already in memory, on every core (one process per core).

Both commands are timed whole (start-up included), in wall-clock seconds and in CPU
seconds of their whole process tree (`timed`); success counts are read from their status
parquets. Printed: images/s and images per CPU-second of each, both ratios mmloom /
img2dataset, and the fraction of the compute limit mmloom reached. On a shared machine
the wall-clock ratio follows the neighbours; the CPU ratio barely moves (what a core
spends per image does not depend on who else waits for it), so it is the figure to
compare across runs. `--fixed-images` first runs both on a few URLs: their start-up CPU,
subtracted to give the per-image CPU ratio that LAION-size shards see; last, each tool's
resizer alone, CPU ms per image by source format. `--peer-tuned`
adds an img2dataset run with one process per core (`--processes_count`), for reference.

    python bench/download.py --images 2000
    python bench/download.py --images 2000 --rounds 2 --peer-tuned
    python bench/download.py --images 1000 --rounds 0 --fixed-images 0 --breakdown
"""

from __future__ import annotations

import argparse
import glob
import io
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import pandas as pd

IMAGE_SIZE, RESIZE_MODE = 256, "keep_ratio"  # mmloom's defaults (download.image_size, resize_mode)


def image_pool(count: int = 48, seed: int = 0) -> list[tuple[str, bytes]]:
    """(format, bytes) of ``count`` images: the demo photos at LAION-like sizes and formats."""
    from PIL import Image

    from mmloom.testkit.demo_data import demo_images

    rng = random.Random(seed)
    photos = [Image.open(io.BytesIO(d)).convert("RGB") for _n, d, *_ in demo_images()][:6]  # the real photos
    out = []
    for i in range(count):
        im = photos[i % len(photos)]
        side = rng.randint(400, 2000)
        s = side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
        buf = io.BytesIO()
        r = rng.random()
        if r < 0.1:
            im.save(buf, "PNG", compress_level=6)
            fmt = "png"
        elif r < 0.2:
            im.save(buf, "WEBP", quality=80)
            fmt = "webp"
        else:
            im.save(buf, "JPEG", quality=rng.randint(75, 95))
            fmt = "jpg"
        out.append((fmt, buf.getvalue()))
    return out


def routes(n: int, pool: list[tuple[str, bytes]], seed: int = 1) -> dict:
    from mmloom.testkit.localserver import Route

    types = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        fmt, data = pool[i % len(pool)]
        r = rng.random()
        if r < 0.02:
            out[f"/img/{i}.{fmt}"] = Route(b"not found", 404, "text/plain")
        elif r < 0.03 and fmt == "jpg":
            out[f"/img/{i}.{fmt}"] = Route(data[: len(data) // 2], content_type=types[fmt])  # truncated
        else:
            out[f"/img/{i}.{fmt}"] = Route(data, content_type=types[fmt])
    return out


def serve(n: int, q) -> None:
    from mmloom.testkit.localserver import LocalServer

    pool = image_pool()
    with LocalServer(routes(n, pool)) as srv:
        q.put(srv.base)
        while True:
            time.sleep(3600)


def urls(base: str, n: int) -> list[str]:
    fmts = [f for f, _ in _pool_formats()]
    return [f"{base}/img/{i}.{fmts[i % len(fmts)]}" for i in range(n)]


_FORMATS: list | None = None


def _pool_formats() -> list:
    global _FORMATS
    if _FORMATS is None:
        _FORMATS = image_pool()
    return _FORMATS


def count_success(folder: str) -> int:
    n = 0
    for p in glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True):
        df = pd.read_parquet(p, columns=["status"])
        n += int((df.status == "success").sum())
    return n


def _limit_worker(args) -> tuple[int, float]:
    blobs, seconds = args
    from mmloom.curate.config import DownloadConfig
    from mmloom.curate.download import make_resizer

    resize = make_resizer(DownloadConfig.model_validate({"image_size": IMAGE_SIZE, "resize_mode": RESIZE_MODE}))
    n, end, cpu = 0, time.perf_counter() + seconds, time.process_time()
    while time.perf_counter() < end:
        for b in blobs:
            resize(io.BytesIO(b))
            n += 1
    return n, time.process_time() - cpu


def per_format_cpu_ms(rounds: int = 2) -> dict[str, dict[str, float]]:
    """CPU milliseconds per image of each tool's resizer (mmloom's ``make_resizer``,
    img2dataset's own ``Resizer`` with its defaults), by source format, over the pool's
    bytes in memory: where the decode time goes."""
    from img2dataset.resizer import Resizer

    from mmloom.curate.config import DownloadConfig
    from mmloom.curate.download import make_resizer

    tools = {"mmloom": make_resizer(DownloadConfig.model_validate({"image_size": IMAGE_SIZE, "resize_mode": RESIZE_MODE})),
             "img2dataset": Resizer(image_size=IMAGE_SIZE, resize_mode=RESIZE_MODE, resize_only_if_bigger=False)}
    out = {}
    for name, resize in tools.items():
        spent: dict[str, list[float]] = {}
        for r in range(rounds + 1):  # the first round warms up
            for fmt, data in _pool_formats():
                t = time.process_time()
                resize(io.BytesIO(data))
                if r:
                    spent.setdefault(fmt, []).append(time.process_time() - t)
        out[name] = {f: 1e3 * sum(v) / len(v) for f, v in spent.items()}
        out[name]["all"] = 1e3 * sum(sum(v) for v in spent.values()) / sum(len(v) for v in spent.values())
    return out


def _cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, all its threads."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def shard_breakdown(meta: str, urls_: list[str], work: str, env: dict, rounds: int = 5) -> list[str]:
    """Where a shard's CPU goes, in this process and without Ray: the Ray task's body
    (``download_shard``) on one shard of every URL, at 64 threads (the default) and at 8,
    in CPU ms per image; the HTTP fetch alone, one URL after another; and the parts of the
    resize path over the pool's bytes (JPEG: header check, DCT-scaled decode, resize,
    encode; PNG and WebP: the full decode and the resize). The lines to print."""
    import cv2
    import numpy as np

    from mmloom import imageguard
    from mmloom.curate.config import DownloadConfig
    from mmloom.curate.download import _REDUCED, dct_reduction, download_shard, make_resizer, output_size
    from mmloom.curate.fetch import FetchError, Limits, fetch

    mm = os.path.join(os.path.dirname(sys.executable), "mmloom")
    n = len(urls_)

    def ingested(name: str, rows: int) -> str:
        src, ds = os.path.join(work, name + ".parquet"), os.path.join(work, name)
        shutil.rmtree(ds, ignore_errors=True)
        pd.read_parquet(meta).head(rows).to_parquet(src, index=False)
        subprocess.run([mm, "ingest", src, "--out", ds, "--shard-size", str(rows), "--no-progress"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        return ds

    out = []
    per = {}
    for threads in (0, 64, 8):  # 0: a few URLs first, so that the imports are not counted
        cfg = DownloadConfig.model_validate({"allow_private_addresses": True, "thread_count": threads or 8}).model_dump()
        rows = n if threads else min(n, 4)
        ds = ingested(f"breakdown-{threads}", rows)
        u, s = _cpu()
        download_shard(0, ds, cfg, rows, False, "bench")
        u2, s2 = _cpu()
        if threads:
            per[threads] = 1e3 * (u2 - u + s2 - s) / rows
    out.append(f"one shard of {n} URLs in this process (download_shard, no Ray): "
               + ", ".join(f"{t} threads {ms:.2f} ms" for t, ms in per.items()) + " of CPU per image")
    limits = Limits(timeout=10.0, deadline=30.0, max_body_bytes=32 << 20, allow_private=True)
    u, s = _cpu()
    for url in urls_:
        try:
            fetch(url, limits, "mmloom")
        except FetchError:
            pass
    u2, s2 = _cpu()
    out.append(f"HTTP fetch alone, one URL after another: {1e3 * (u2 - u) / n:.2f} ms user + {1e3 * (s2 - s) / n:.2f} ms system per URL")
    resizer = make_resizer(DownloadConfig.model_validate({"image_size": IMAGE_SIZE, "resize_mode": RESIZE_MODE}))
    cv2.setNumThreads(1)
    parts: dict[str, dict[str, float]] = {}
    whole = jpegs = 0
    for _ in range(rounds):
        for fmt, data in _pool_formats():
            t = [time.process_time()]
            head = imageguard.inspect(data, 1 << 40)
            t.append(time.process_time())
            w, h = output_size(resizer, head.width, head.height)
            r = dct_reduction(head.width, head.height, w, h) if fmt == "jpg" else 1
            flags = (getattr(cv2, _REDUCED[r]) if r > 1 else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
            img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
            t.append(time.process_time())
            img = cv2.resize(img, (w, h), interpolation=resizer.downscale_interpolation)
            t.append(time.process_time())
            cv2.imencode(f".{resizer.encode_format}", img, params=resizer.encode_params)
            t.append(time.process_time())
            acc = parts.setdefault(fmt, {"header": 0.0, "decode": 0.0, "resize": 0.0, "encode": 0.0, "n": 0})
            for k, a, b in zip(("header", "decode", "resize", "encode"), t, t[1:]):
                acc[k] += b - a
            acc["n"] += 1
            if fmt == "jpg":
                jpegs += 1
                whole += r == 1
    for fmt, acc in parts.items():
        k = acc.pop("n")
        line = f"{fmt} ({k // rounds} images x {rounds}): " + ", ".join(f"{name} {1e3 * v / k:.2f}" for name, v in acc.items()) + " ms"
        if fmt == "jpg":
            line += f" (the decode DCT-scaled; {whole // rounds} of {jpegs // rounds} too small to shrink 2x, decoded whole)"
        out.append(line)
    return out


def compute_limit(seconds: float) -> tuple[float, float]:
    """(images/s of mmloom's decode + resize on every core, the image bytes in memory;
    images per CPU-second of the same loop). The second does not depend on what else the
    machine runs: cores x it is the limit of an idle machine."""
    blobs = [d for _f, d in _pool_formats()]
    cores = os.cpu_count() or 1
    with mp.get_context("spawn").Pool(cores) as p:
        p.map(_limit_worker, [(blobs[:2], 0.5)] * cores)  # imports and warm-up
        t = time.perf_counter()
        res = p.map(_limit_worker, [(blobs, seconds)] * cores)
        wall = time.perf_counter() - t
    n = sum(k for k, _ in res)
    return n / wall, n / max(1e-9, sum(c for _, c in res))


def timed(cmd: list[str], env: dict, poll: float = 0.05) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``cmd`` and every process it starts.

    CPU time is what neighbours on a shared machine do not change much: the user+system
    time of the command's process tree (Ray's GCS, raylet and workers, img2dataset's
    processes and threads), read with psutil every ``poll`` seconds and kept per process at
    its last reading, so a process that exits is counted up to its last poll (the error is
    at most ``poll`` CPU-seconds per process, and a process that lives less than ``poll``
    may be missed: neither command starts such processes in numbers)."""
    import psutil

    seen: dict[tuple[int, float], float] = {}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                c = p.cpu_times()
                seen[(p.pid, p.create_time())] = c.user + c.system  # children are in the tree themselves
            except psutil.NoSuchProcess:
                pass
        time.sleep(poll)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return wall, sum(seen.values())


def run_img2dataset(meta: str, out: str, env: dict, extra: list[str]) -> tuple[float, int, float]:
    bindir = os.path.dirname(sys.executable)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [os.path.join(bindir, "img2dataset"), "--url_list", meta, "--input_format", "parquet",
           "--url_col", "URL", "--caption_col", "TEXT", "--output_format", "webdataset", "--output_folder", out,
           "--image_size", str(IMAGE_SIZE), "--resize_mode", RESIZE_MODE, *extra]
    wall, cpu = timed(cmd, env)
    return wall, count_success(out), cpu


def run_mmloom(meta: str, work: str, env: dict, shard_size: int) -> tuple[float, int, float]:
    mm = os.path.join(os.path.dirname(sys.executable), "mmloom")
    ds = os.path.join(work, "mmloom")
    shutil.rmtree(ds, ignore_errors=True)
    subprocess.run([mm, "ingest", meta, "--out", ds, "--shard-size", str(shard_size), "--no-progress"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    cfg = os.path.join(work, "bench.yaml")
    with open(cfg, "w") as f:
        f.write(f"ingest:\n  shard_size: {shard_size}\ndownload:\n  allow_private_addresses: true\n")
    wall, cpu = timed([mm, "download", ds, "--config", cfg, "--no-progress"], env)
    return wall, count_success(os.path.join(ds, "images")), cpu


def ratios(res: dict, peer: str) -> tuple[float, float]:
    """mmloom / ``peer``: (images/s, images per CPU-second)."""
    (ms, mok, mcpu), (ps, pok, pcpu) = res["mmloom"], res[peer]
    return (mok / ms) / (pok / ps), (mok / mcpu) / (pok / pcpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=1, help="img2dataset and mmloom measured in turn this many times")
    ap.add_argument("--peer-tuned", action="store_true", help="also img2dataset with --processes_count = cores")
    ap.add_argument("--limit-seconds", type=float, default=10.0)
    ap.add_argument("--fixed-images", type=int, default=8,
                    help="also run both on this many URLs to measure their fixed CPU cost (0: skip)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--breakdown", action="store_true",
                    help="also where a shard's CPU goes: download_shard in this process without Ray, the HTTP fetch alone, "
                         "and each part of the resize path by format")
    a = ap.parse_args()

    cores = os.cpu_count() or 1
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        # both commands start Python processes that import the same heavy packages (torch,
        # albumentations, cv2 ...); without bytecode each import compiles from source. pip
        # installs write it; do the same once here, so neither side pays for it
        import compileall
        import sysconfig

        compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=2, workers=cores)
    work = a.workdir or tempfile.mkdtemp(prefix="mmloom-bench-dl-")
    q = mp.get_context("spawn").Queue()
    server = mp.get_context("spawn").Process(target=serve, args=(a.images, q), daemon=True)
    server.start()
    base = q.get(timeout=300)
    def metadata(path: str, n: int) -> str:
        pd.DataFrame({
            "URL": urls(base, n), "TEXT": [f"benchmark image {i}" for i in range(n)],
            "WIDTH": 1024, "HEIGHT": 768, "similarity": 0.35, "punsafe": 0.0, "pwatermark": 0.0,
        }).to_parquet(path, index=False)
        return path

    meta = metadata(os.path.join(work, "meta.parquet"), a.images)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    shard_size = max(1, -(-a.images // (2 * cores)))
    fmts = [f for f, _ in _pool_formats()]
    print(f"{a.images} URLs over {len(fmts)} images (longer side 400-2000 px; {fmts.count('jpg')} JPEG, "
          f"{fmts.count('png')} PNG, {fmts.count('webp')} WebP), ~3% failures; {cores} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start; image_size {IMAGE_SIZE}, {RESIZE_MODE}")
    rows = []
    try:
        fixed = {}
        if a.fixed_images:
            # start-up and shut-down CPU (Ray's processes, worker imports; img2dataset's
            # processes), measured on a handful of URLs: what a 10,000-row LAION shard amortizes
            small = metadata(os.path.join(work, "small.parquet"), a.fixed_images)
            fixed = {"img2dataset": run_img2dataset(small, os.path.join(work, "i2d"), env, [])[2],
                     "mmloom": run_mmloom(small, work, env, max(1, -(-a.fixed_images // (2 * cores))))[2]}
            print(f"fixed cost ({a.fixed_images} URLs): img2dataset {fixed['img2dataset']:.1f} CPU-s, "
                  f"mmloom {fixed['mmloom']:.1f} CPU-s", flush=True)
        for r in range(a.rounds):
            res = {"img2dataset": run_img2dataset(meta, os.path.join(work, "i2d"), env, [])}
            res["mmloom"] = run_mmloom(meta, work, env, shard_size)
            if a.peer_tuned:
                res["img2dataset tuned"] = run_img2dataset(meta, os.path.join(work, "i2d"), env, ["--processes_count", str(cores)])
            rows.append(res)
            print(f"round {r + 1}:")
            for name, (secs, ok, cpu) in res.items():
                print(f"  {name:<18} {ok:>6} ok in {secs:7.1f} s  = {ok / secs:8.1f} images/s;"
                      f" {cpu:7.1f} CPU-s = {ok / cpu:6.1f} images per CPU-second")
            ratio, cpu_ratio = ratios(res, "img2dataset")
            tuned = ""
            if a.peer_tuned:
                t_ratio, t_cpu = ratios(res, "img2dataset tuned")
                tuned = f"; vs img2dataset with {cores} processes {t_ratio:.2f} (per CPU-second {t_cpu:.2f})"
            print(f"  ratio mmloom / img2dataset (its defaults): {ratio:.2f} images/s, {cpu_ratio:.2f} per CPU-second{tuned}",
                  flush=True)
            if fixed:
                per = {k: (res[k][2] - fixed[k]) / max(1, res[k][1]) for k in fixed}
                print(f"  per image beyond the fixed cost: img2dataset {per['img2dataset'] * 1e3:.2f} ms, mmloom "
                      f"{per['mmloom'] * 1e3:.2f} ms of CPU: ratio {per['img2dataset'] / max(1e-9, per['mmloom']):.2f} "
                      f"(the ratio at LAION shard sizes)", flush=True)
        if a.breakdown:
            print("where a shard's CPU goes:\n  " + "\n  ".join(shard_breakdown(meta, urls(base, a.images), work, env)), flush=True)
    finally:
        server.terminate()
    if rows:
        summary(rows, a.limit_seconds, cores)
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


def summary(rows: list[dict], limit_seconds: float, cores: int) -> None:
    """The compute limit, the fraction of it mmloom reached, the ratios over the rounds and
    each tool's resizer by source format."""
    limit, limit_cpu = compute_limit(limit_seconds)
    peer = "img2dataset"
    mm = [ok / secs for secs, ok, _ in (res["mmloom"] for res in rows)]
    mm_cpu = [ok / cpu for _, ok, cpu in (res["mmloom"] for res in rows)]
    print(f"compute limit (mmloom's header check + decode + resize + encode, bytes in memory, {cores} processes): "
          f"{limit:.1f} images/s now, {limit_cpu:.1f} images per CPU-second (x {cores} cores = "
          f"{limit_cpu * cores:.0f} images/s on an idle machine)")
    print(f"mmloom reached {max(mm) / limit:.1%} of the compute limit measured now and {max(mm_cpu) / limit_cpu:.1%} "
          f"per CPU-second (best round); ratio over rounds: "
          f"{' '.join(f'{ratios(res, peer)[0]:.2f}' for res in rows)} images/s, "
          f"{' '.join(f'{ratios(res, peer)[1]:.2f}' for res in rows)} per CPU-second; "
          f"load average at end {os.getloadavg()[0]:.1f}")
    per = per_format_cpu_ms()
    print("decode + resize + encode, CPU ms per image by source format: " + "; ".join(
        f"{name} " + ", ".join(f"{f} {ms:.1f}" for f, ms in costs.items()) for name, costs in per.items()))


if __name__ == "__main__":
    main()
