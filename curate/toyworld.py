"""`mmloom toyworld --out DIR`: a toy world curated end to end by the real pipeline.

Renders ``n`` pictures of coloured shapes (testkit/toyworld.py), writes them as
LAION-format metadata with a ``BOXES`` column (one {phrase, box} record per object, as
COCO or Objects365 come with boxes), serves the pictures from 127.0.0.1 and runs ingest,
download, score, select, ground (``ground.backend: boxes``) and build with
configs/toyworld.yaml. The crop rules, prompts and shards are the real ones, so a model
trained on DIR learns from what mmloom would give it; `mmloom eval` then measures whether
it puts the named colour and shape where the prompt puts them.
"""

from __future__ import annotations

import hashlib
import os

import pandas as pd

from .config import load_config
from .demo import example_prompts, prepare_dir
from mmloom.errors import UserError

MARKER = ".mmloom-toyworld"


def toyworld_metadata(server, seed: int, n: int) -> pd.DataFrame:
    """LAION-5B-format rows for ``n`` toy pictures (seeds ``seed * 1_000_003 + i``), served by ``server``."""
    from ..testkit.demo_data import jpeg_bytes
    from ..testkit.localserver import Route
    from ..testkit.toyworld import render_scene, scene_boxes

    rows = []
    for i in range(n):
        scene = render_scene(seed * 1_000_003 + i)
        url = server.add(f"/toy/{seed}/{i:06d}.jpg", Route(jpeg_bytes(scene.image, quality=95)))
        w, h = scene.image.size
        rows.append({
            "SAMPLE_ID": i, "URL": url, "TEXT": scene.caption, "WIDTH": w, "HEIGHT": h,
            "LICENSE": "?", "NSFW": "UNLIKELY", "LANGUAGE": "en", "similarity": 0.35,
            "hash": int(hashlib.md5(f"{url}{scene.caption}".encode()).hexdigest()[:15], 16),
            "punsafe": 0.01, "pwatermark": 0.01, "AESTHETIC_SCORE": 5.0,
            "BOXES": scene_boxes(scene),
        })
    return pd.DataFrame(rows)


def toyworld_config(out: str, config: str | None = None, clip: str | None = None):
    """configs/toyworld.yaml (or ``config``) with tiny random-weight scoring models built
    under DIR/models; ``clip``: the score stage's CLIP instead of the random one (the
    embeddings the shards store, which Kandinsky's prior learns and Versatile Diffusion's
    image context reads; its embeddings must be 32-d, as the tiny aesthetic and NSFW heads)."""
    from importlib.resources import files

    from ..testkit.tiny_scoring import make_score_models

    path = config or str(files("mmloom") / "configs" / "toyworld.yaml")
    load_config(path)  # validated before any model is built
    score = make_score_models(os.path.join(out, "models"))
    if clip is not None:
        clip = os.path.abspath(clip) if os.path.isdir(clip) else clip  # the stage's workers may run elsewhere
        score["clip"]["model"] = score["aesthetic"]["clip_model"] = clip
    return load_config(path, {"score": score})


def run_toyworld(out: str, seed: int = 0, n: int = 256, config: str | None = None, ray_address: str | None = None,
                 progress: bool = True, echo=print, clip: str | None = None) -> dict:
    from .run import run_stages
    from .stages import NAMES
    from .stats import funnel, render
    from ..manifests.lock import writer_lock
    from ..testkit.localserver import LocalServer

    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    out = os.path.abspath(out)
    prepare_dir(out, MARKER, "toy world")
    echo("[toyworld] tiny random-weight scoring models (" + ("CLIP, " if clip is None else "") + "aesthetic, watermark: "
         "their scores mean nothing, the toy world's select rules leave them off); nudenet, faces, geometry, captions are real"
         + ("" if clip is None else f"; CLIP: {clip}"))
    cfg = toyworld_config(out, config, clip)
    with LocalServer({}) as server, writer_lock(out, "toyworld"):
        meta = toyworld_metadata(server, seed, n)
        meta_path = os.path.join(out, "metadata", f"toyworld-{seed}.parquet")
        os.makedirs(os.path.dirname(meta_path))
        meta.to_parquet(meta_path, index=False)
        echo(f"[toyworld] {len(meta)} pictures (seed {seed}) with captions and boxes, served from {server.base}")
        done = run_stages(cfg, out, [s for s in cfg.run.stages if s in NAMES], [meta_path], ray_address, progress,
                          echo, "rerun `mmloom toyworld`")
    f = funnel(out)
    echo(render(f))
    echo("\nInterleaved prompts (first few):")
    for text in example_prompts(out, 3):
        echo("  " + text)
    b = done.get("build", {})
    echo(f"\nToy world ready in {out}: {b.get('built', 0)} samples with {b.get('crops', 0)} crops; "
         f"dataset card {b.get('card')}\nTrain on it, then measure: mmloom eval RUN --shards DIR_OF_HELD_OUT_TOY_WORLD")
    return {"out": out, **done, "funnel": f}
