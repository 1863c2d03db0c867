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

from .config import load_config
from ..testkit.demo_data import demo_images, fault_routes
from ..testkit.localserver import LocalServer, Route
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
        if name == "rocket.jpg":  # a semantic near-duplicate that perceptual hashes miss (30 bits apart)
            add(server.add("/img/rocket_mirrored.jpg", Route(_mirrored(data))), "the rocket on its launch pad, seen mirrored", w, h)
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


def _mirrored(data: bytes) -> bytes:
    import io

    from PIL import Image, ImageOps

    buf = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(data)).convert("RGB")).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def prepare_dir(out: str, marker: str = MARKER, what: str = "demo") -> None:
    """An empty ``out`` for a generated dataset; one it made before (holding ``marker``) is replaced."""
    if os.path.exists(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, marker)):
            raise UserError(f"{out} exists and is not a {what} directory; choose another --out")
        shutil.rmtree(out)
    os.makedirs(out)
    open(os.path.join(out, marker), "w").close()


def run_demo(out: str, ray_address: str | None = None, progress: bool = True, echo=print, family: str = "mumu") -> dict:
    from .run import run_stages
    from .stages import NAMES
    from .stats import funnel, render
    from ..testkit.tiny_scoring import make_grounding_dino, make_score_models
    from ..manifests.lock import writer_lock

    out = os.path.abspath(out)
    demo_family(family)  # before any work is done
    prepare_dir(out)
    echo("[demo] building tiny random-weight scoring models (CLIP, aesthetic head, watermark); NSFW uses nudenet's real detector")
    score_cfg = make_score_models(os.path.join(out, "models"))
    words = sorted({w for _n, _d, c, _w, _h in demo_images() for w in c.lower().split()})
    dino = make_grounding_dino(os.path.join(out, "models", "tiny-grounding-dino"), words)
    cfg = load_config(None, {
        "score": score_cfg,
        # random-weight CLIP and watermark scores mean nothing: the demo keeps those rules off
        # and selects on nudenet (real), geometry, captions and near-duplicates; the tiny CLIP
        # maps every image within about 0.97 cosine of every other, so only near-identical
        # embeddings (the mirrored rocket: 0.999) count as semantic duplicates here
        "select": {"min_clip_score": None, "max_watermark": None, "max_nsfw": 0.5, "semantic_dedup_threshold": 0.999},
        "ground": {"model": dino},
        "download.image_size": 512,
        "ingest.shard_size": 8,
        "download.allow_private_addresses": True,  # the demo server is on 127.0.0.1
        "download.timeout": 5,
        "download.thread_count": 16,
    })
    with LocalServer({}) as server, writer_lock(out, "demo"):
        meta = demo_metadata(server)
        meta_path = os.path.join(out, "metadata", "demo-laion.parquet")
        os.makedirs(os.path.dirname(meta_path))
        meta.to_parquet(meta_path, index=False)
        echo(f"[demo] {len(meta)} metadata rows served from {server.base}")
        done = run_stages(cfg, out, NAMES, [meta_path], ray_address, progress, echo, "rerun the demo")
    echo("[demo] RANDOM-WEIGHT models (plumbing only, no judgement): clip_score, watermark, aesthetic, Grounding DINO "
         "boxes. Real models: nsfw (nudenet), faces (OpenCV cascade), phash, geometry, caption cleaning.")
    f = funnel(out)
    echo(render(f))
    echo("\nInterleaved prompts (first few):")
    for text in example_prompts(out, 5):
        echo("  " + text)
    echo(f"\nDataset card: {done['build']['card']}")
    from .browse import write_site

    site = write_site(out, cfg.download.encode_format, progress)
    echo(f"Browse every selected and rejected sample: file://{site['index']} (`mmloom browse {out} --serve` adds search)")
    t = train_demo(out, ray_address, echo, family=family)
    echo(f"\nDataset ready in {out}\nQuery it, for example:\n"
         f"  mmloom query {out} \"SELECT status, count(*) FROM downloads GROUP BY status\"")
    return {"out": out, **done, "funnel": f, "train": t}


def demo_family(family: str):
    """The registered family (its ``demo`` says what the demo trains); a clear error for any other name."""
    from ..train.families import get_family

    return get_family(family)


def train_demo(out: str, ray_address: str | None, echo=print, steps: int = 40, family: str = "mumu") -> dict:
    """Train the family's tiny config(s) (its ``demo``) on the demo's final/ shards, sample
    one image from a prompt built from the shards with the family's sampling defaults
    (each run draws its own loss curve, loss.png)."""
    from importlib.resources import files

    from mmloom.configbase import load_model
    from .dataset import dataset_config
    from ..train.config import TrainConfig
    from ..train.loop import read_metrics, train
    from ..train.sample import sample

    fam = demo_family(family)
    demo = fam.demo
    clip = dataset_config(out, None).score.clip.model  # the CLIP whose embeddings the score stage stored
    runs = {}
    for name in demo.configs:
        run_dir = os.path.join(out, "runs", name)
        over = {"data.shards": out, "loop.out": run_dir, "loop.steps": steps, "loop.checkpoint_every": steps,
                **fam.demo_overrides(name, runs, clip)}
        cfg = load_model(TrainConfig, str(files("mmloom") / "configs" / "train" / f"{name}.yaml"), over)
        echo(f"[train] {name}: {demo.what}, {steps} steps on CPU ...")
        r = train(cfg, echo=echo)  # writes loss.png beside its metrics
        hist = read_metrics(run_dir)
        echo(f"[train] {name}: loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f} (mean of first 10 "
             f"{_mean(hist[:10]):.3f}, last 10 {_mean(hist[-10:]):.3f}), {r['images_per_s_mean']:.1f} images/s "
             "(mean over the run)")
        runs[name] = run_dir
    run_dir = runs[demo.configs[-1]]
    prompt = fam.demo_prompt(_prompt_images(out, run_dir, demo.prompt_images))
    png = sample(run_dir, prompt, os.path.join(run_dir, "sample.png"), seeds=[0], **demo.options)
    how = cfg.model.sampling.summary() + (f", {demo.note}" if demo.note else "")
    echo(f"[sample] {how}: {png} (random-init models: expect noise, not a picture)")
    echo(f"[train] loss curves: {', '.join(os.path.join(r, 'loss.png') for r in runs.values())}")
    return {"family": family, "runs": runs, "steps": len(hist), "sample": png, "loss_plot": os.path.join(run_dir, "loss.png"),
            "first_loss": hist[0]["loss"], "last_loss": hist[-1]["loss"],
            "first10": _mean(hist[:10]), "last10": _mean(hist[-10:])}


def _mean(hist: list[dict]) -> float:
    return sum(h["loss"] for h in hist) / max(1, len(hist))


def _prompt_images(out: str, run_dir: str, n: int) -> list[str]:
    """The first ``n`` crops of the demo shards, saved beside the run for a prompt."""
    import glob

    from ..train.data import read_members
    from ..train.prompts import resolve_segments

    paths = []
    shards = sorted(glob.glob(os.path.join(out, "final", "*.tar")))
    for sample in read_members(shards, {"prompt.json", "crops.jpg"}):
        for seg in resolve_segments(sample):
            if seg["type"] == "image" and len(paths) < n:
                p = os.path.join(run_dir, f"prompt_image_{len(paths)}.jpg")
                seg["image"].save(p, quality=95)
                paths.append(p)
        if len(paths) >= n:
            break
    return paths


def example_prompts(root: str, n: int) -> list[str]:
    """Rendered prompts read back from final/ with plain webdataset."""
    import glob

    from .prompt import render as render_prompt
    from ..train.data import read_members

    out = []
    shards = sorted(glob.glob(os.path.join(root, "final", "*.tar")))
    for sample in read_members(shards, {"prompt.json"}):  # decodes that member alone, safely
        out.append(render_prompt(sample["prompt.json"]["segments"], sample["prompt.json"]["crops"]))
        if len(out) >= n:
            break
    return out
