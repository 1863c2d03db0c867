"""`mmloom demo`: the whole pipeline on an embedded dataset, with no network.

Writes a small LAION-format metadata parquet (real photographs shipped inside installed
packages, generated pictures, and deliberately broken entries), serves the images from a
local HTTP server on 127.0.0.1, and runs the stages on it.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pandas as pd

from mmloom.curate.config import load_config
from mmloom.curate.dataset import save_dataset_config
from mmloom.curate.demo_data import demo_images, fault_routes
from mmloom.curate.localserver import LocalServer, Route
from mmloom.errors import UserError

MARKER = ".mmloom-demo"


def demo_metadata(server: LocalServer) -> pd.DataFrame:
    """LAION-5B-format metadata for the demo images, faults and rows that must be filtered."""
    rows = []

    def add(url, text, w, h, sim=0.33, punsafe=0.02, pwm=0.05):
        rows.append({
            "SAMPLE_ID": len(rows) + 1, "URL": url, "TEXT": text,
            "HEIGHT": h, "WIDTH": float(w) if w is not None else None,  # LAION has both int and float sizes
            "LICENSE": "?", "NSFW": "UNLIKELY", "LANGUAGE": "en",
            "similarity": sim, "hash": int(hashlib.md5(f"{url}{text}".encode()).hexdigest()[:15], 16),
            "punsafe": punsafe, "pwatermark": pwm, "AESTHETIC_SCORE": 5.5,
        })

    images = demo_images()
    for name, data, caption, w, h in images:
        add(server.add(f"/img/{name}", Route(data)), caption, w, h)
    good = images[0][1]
    for path, (route, _expected) in fault_routes(good, server.url("/img/" + images[1][0])).items():
        add(server.add(path, route), f"a photo served by {path}", 512, 512)
    # rows the ingest stage must catch
    add(None, "a row without a url", 512, 512)
    add("ftp://example.org/a.jpg", "a row with an ftp url", 512, 512)
    add(server.url("/img/" + images[2][0]), "a very wide panorama of a cat", 1536, 400)
    add(server.url("/img/" + images[3][0]), "a rocket flagged unsafe", 512, 512, punsafe=0.9)
    add(server.url("/img/" + images[4][0]), "a camera with a watermark", 512, 512, pwm=0.8)
    add(server.url("/img/" + images[5][0]), "a motorcycle with an unrelated caption", 512, 512, sim=0.12)
    rows.append(dict(rows[0]))  # an exact duplicate url+caption pair
    df = pd.DataFrame(rows)
    df["HEIGHT"] = df["HEIGHT"].astype("Int64")
    return df


def prepare_dir(out: str) -> None:
    if os.path.exists(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, MARKER)):
            raise UserError(f"{out} exists and is not a demo directory; choose another --out")
        shutil.rmtree(out)
    os.makedirs(out)
    open(os.path.join(out, MARKER), "w").close()


def run_demo(out: str, ray_address: str | None = None, progress: bool = True, echo=print) -> dict:
    from mmloom.curate.download import download
    from mmloom.curate.ingest import ingest
    from mmloom.curate.score import score
    from mmloom.curate.stats import funnel, render
    from mmloom.filters.select import render_funnel, select
    from mmloom.curate.build import build
    from mmloom.curate.card import write_card
    from mmloom.curate.ground import ground
    from mmloom.filters.tiny_models import make_grounding_dino, make_score_models

    out = os.path.abspath(out)
    prepare_dir(out)
    echo("[demo] building tiny random-weight scoring models (CLIP, aesthetic head, watermark); NSFW uses nudenet's real detector")
    score_cfg = make_score_models(os.path.join(out, "models"))
    words = sorted({w for _n, _d, c, _w, _h in demo_images() for w in c.lower().split()})
    dino = make_grounding_dino(os.path.join(out, "models", "tiny-grounding-dino"), words)
    cfg = load_config(None, {
        "score": score_cfg,
        # random-weight CLIP and watermark scores mean nothing: the demo keeps those rules off
        # and selects on nudenet (real), geometry, captions and near-duplicates
        "select": {"min_clip_score": None, "max_watermark": None, "max_nsfw": 0.5},
        "ground": {"model": dino},
        "download.image_size": 512,
        "ingest.shard_size": 8,
        "download.allow_private_addresses": True,  # the demo server is on 127.0.0.1
        "download.timeout": 5,
        "download.thread_count": 16,
    })
    with LocalServer({}) as server:
        meta = demo_metadata(server)
        meta_path = os.path.join(out, "metadata", "demo-laion.parquet")
        os.makedirs(os.path.dirname(meta_path))
        meta.to_parquet(meta_path, index=False)
        echo(f"[demo] {len(meta)} metadata rows served from {server.base}")
        save_dataset_config(out, cfg)
        s = ingest([meta_path], out, cfg, ray_address, progress)
        echo(f"[ingest] {s['input_rows']} rows -> {s['rows']} in {s['shards']} shards ({s['duplicates']} duplicates dropped): {s['status_counts']}")
        d = download(out, cfg, ray_address, progress=progress)
        echo(f"[download] {d['committed']}/{d['shards']} shards committed: {d['status_counts']}")
        if d["failed"]:
            raise UserError(f"download failed for shards {[f['shard'] for f in d['failed']]}: {d['failed'][0]['error']}")
        sc = score(out, cfg, ray_address, progress)
        echo(f"[score] {sc['rows']} images scored in {sc['committed']} shards")
        if sc["failed"]:
            raise UserError(f"score failed for shards {[f['shard'] for f in sc['failed']]}: {sc['failed'][0]['error']}")
    sel = select(out, cfg)
    echo("[select] " + render_funnel(sel))
    g = ground(out, cfg, ray_address, progress)
    echo(f"[ground] {g['boxes']} boxes in {g['committed']} shards (tiny RANDOM-WEIGHT Grounding DINO: boxes are plumbing, not judgement)")
    b = build(out, cfg, ray_address, progress)
    echo(f"[build] {b['built']} of {b['samples']} selected samples in final/ with {b['crops']} crops")
    card = write_card(out, cfg)
    echo("[select] RANDOM-WEIGHT scores (plumbing only, no judgement): clip_score, watermark, aesthetic. "
         "Real models: nsfw (nudenet), faces (OpenCV cascade), phash, geometry, caption cleaning.")
    f = funnel(out)
    echo(render(f))
    echo("\nInterleaved prompts (first few):")
    for text in example_prompts(out, 5):
        echo("  " + text)
    echo(f"\nDataset card: {card}")
    echo(f"\nDataset ready in {out}\nQuery it, for example:\n"
         f"  mmloom query {out} \"SELECT status, count(*) FROM downloads GROUP BY status\"")
    return {"out": out, "ingest": s, "download": d, "score": sc, "select": sel, "ground": g, "build": b, "funnel": f}


def example_prompts(root: str, n: int) -> list[str]:
    """Rendered prompts read back from final/ with plain webdataset."""
    import glob

    import webdataset as wds

    from mmloom.curate.prompt import render as render_prompt

    out = []
    shards = sorted(glob.glob(os.path.join(root, "final", "*.tar")))
    for sample in wds.WebDataset(shards, shardshuffle=False).decode():
        out.append(render_prompt(sample["prompt.json"]["segments"]))
        if len(out) >= n:
            break
    return out
