"""Shared fixtures: one in-process Ray for the session, a local image server with faults,
and writers of small metadata tables in the real LAION / COYO schemas."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# one Ray auth mode for the whole session, whatever this machine has seen before: every
# in-process cluster, `ray start` node and subprocess driver uses the token (Ray makes
# ~/.ray/auth_token on first use)
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "HF_DATASETS_CACHE" not in os.environ:  # not the user's cache; gone when the session ends
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mmloom-test-hf-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import socket

import pandas as pd
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# An S3 endpoint for the object-store tests (moto's S3 server, started on demand). The
# address is fixed here, before any Ray node starts, so that every worker inherits it.
S3_PORT = _free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="mmloom-test",
                  AWS_SECRET_ACCESS_KEY="mmloom-test", AWS_DEFAULT_REGION="us-east-1")

from mmloom.testkit.demo_data import demo_images, fault_routes
from mmloom.testkit.localserver import LocalServer, Route


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from mmloom.curate.runner import init_ray

    init_ray(None)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3 API (moto's server) on localhost; yields the URL of an empty bucket."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    srv.start()
    s3fs.S3FileSystem().mkdir("mmloom-test")
    yield "s3://mmloom-test"
    srv.stop()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """Tiny models (``tiny:unet`` ...) made once for the session in a private folder."""
    old = os.environ.get("MMLOOM_TINY_CACHE")
    os.environ["MMLOOM_TINY_CACHE"] = str(tmp_path_factory.mktemp("tiny-cache"))
    yield os.environ["MMLOOM_TINY_CACHE"]
    if old is None:
        os.environ.pop("MMLOOM_TINY_CACHE", None)
    else:
        os.environ["MMLOOM_TINY_CACHE"] = old


@pytest.fixture(scope="session")
def images():
    return demo_images()


@pytest.fixture(scope="session")
def pics(images):
    """The demo's photographs decoded to RGB, by file name (in the demo's order)."""
    import io

    from PIL import Image

    return {name: Image.open(io.BytesIO(data)).convert("RGB") for name, data, *_ in images}


@pytest.fixture()
def server(images):
    with LocalServer({}) as srv:
        for name, data, _caption, _w, _h in images:
            srv.add(f"/img/{name}", Route(data))
        yield srv


def laion_table(rows: list[dict]) -> pd.DataFrame:
    """rows of {url, text, ...overrides} -> a LAION-5B-schema frame."""
    out = []
    for i, r in enumerate(rows):
        out.append({
            "URL": r["url"], "TEXT": r.get("text", f"caption {i}"),
            "WIDTH": r.get("width", 512), "HEIGHT": r.get("height", 512),
            "similarity": r.get("similarity", 0.35), "punsafe": r.get("punsafe", 0.01),
            "pwatermark": r.get("pwatermark", 0.01), "AESTHETIC_SCORE": r.get("aesthetic", 5.0),
            "hash": i, "SAMPLE_ID": 1000 + i, "LICENSE": "?", "LANGUAGE": "en", "NSFW": "UNLIKELY",
        })
    return pd.DataFrame(out)


def write_laion(path, rows: list[dict]) -> str:
    laion_table(rows).to_parquet(path, index=False)
    return str(path)


@pytest.fixture()
def fault_server(images):
    """Server with the good images and every fault; yields (server, {url: expected status})."""
    with LocalServer({}) as srv:
        expected = {}
        for name, data, _c, _w, _h in images[:6]:
            expected[srv.add(f"/img/{name}", Route(data))] = "success"
        for path, (route, status) in fault_routes(images[0][1], srv.url("/img/" + images[1][0]), hang_seconds=4).items():
            expected[srv.add(path, route)] = status
        yield srv, expected


RAW_CAPTIONS = [
    "<b>A woman astronaut</b> in a white spacesuit [IMG_0042] http://nasa.example/a.jpg",
    "a woman in a navy uniform with medals -- photo by navy.mil",
    "\u201cA cup of coffee\u201d on a saucer with a spoon",
    "a ginger cat looking to the side {cat_pics}",
    "a red circle on a grey background",
    "a blue square on a grey background",
]


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, images, ray_local):
    """`mmloom run` once for the session on six captioned images in two shards, with tiny
    real-format models: (dataset dir, pipeline config, logs, logs of a second run)."""
    import yaml

    from mmloom.curate.run import run_pipeline
    from mmloom.testkit.localserver import LocalServer, Route
    from mmloom.testkit.tiny_scoring import make_grounding_dino, make_score_models

    tmp = tmp_path_factory.mktemp("pipe")
    by_name = {n: d for n, d, *_ in images}
    names = ["astronaut.jpg", "grace_hopper.jpg", "coffee.jpg", "chelsea.jpg", "shape0.jpg", "shape1.jpg"]
    score_cfg = make_score_models(str(tmp / "models"))
    words = sorted({w for c in RAW_CAPTIONS for w in c.lower().replace("\u201c", " ").replace("\u201d", " ").split()})
    dino = make_grounding_dino(str(tmp / "models" / "dino"), words)
    with LocalServer({}) as srv:
        rows = [{"url": srv.add(f"/i/{n}", Route(by_name[n])), "text": c} for n, c in zip(names, RAW_CAPTIONS)]
        write_laion(tmp / "meta.parquet", rows)
        pipe = {
            "run": {"sources": ["meta.parquet"], "out": str(tmp / "ds")},
            "ingest": {"shard_size": 3},
            "download": {"allow_private_addresses": True, "image_size": 512},
            "score": score_cfg,
            "select": {"min_clip_score": None, "max_watermark": None, "max_nsfw": 0.5, "dedup_max_distance": None},
            "ground": {"model": dino, "box_threshold": 0.3},
            "build": {"min_crop_area": 2500, "min_crops": 1},
        }
        (tmp / "pipe.yaml").write_text(yaml.safe_dump(pipe))
        logs = []
        rc = run_pipeline(str(tmp / "pipe.yaml"), None, None, progress=False, echo=lambda *a, **k: logs.append(" ".join(map(str, a))))
        assert rc == 0, logs
        # resuming: everything is committed, every stage skips its shards
        logs2 = []
        rc = run_pipeline(str(tmp / "pipe.yaml"), None, None, progress=False, echo=lambda *a, **k: logs2.append(" ".join(map(str, a))))
        assert rc == 0
    return tmp / "ds", pipe, logs, logs2


# -- a small built dataset, made in seconds without models: the real build stage over
# hand-written upstream shards whose samples differ in crop count and head crops
CROP_PLAN = [  # per shard: one entry per sample, (caption, [(phrase, person?)...])
    [("a red circle", [("red circle", False)])] * 5
    + [("a man and a woman with a dog", [("man", True), ("woman", True), ("dog", False)]),
       ("a cat and a ball", [("cat", False), ("ball", False)])],
    [("a boy on grass", [("boy", True)]), ("a cup and a saucer", [("cup", False), ("saucer", False)])],
]


def write_crops_dataset(root: str) -> str:
    """DIR with committed download, score (with embeddings), select and ground records,
    then `build_shard` run in process: final/ tars, manifest/ and crops/ tables."""
    import io
    import os
    import tarfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    from mmloom.curate.build import build_shard
    from mmloom.curate.config import BuildConfig
    from mmloom.curate.ground import SCHEMA
    from mmloom.manifests.store import ShardStore, shard_name

    store = ShardStore(root)
    rng = np.random.default_rng(0)
    selected, rejects = [], []
    for shard, plan in enumerate(CROP_PLAN):
        staging = store.staging_dir("images", shard)
        tar_path = os.path.join(staging, "t.tar")
        dets, scores = [], []
        with tarfile.open(tar_path, "w") as t:
            for i, (caption, phrases) in enumerate(plan):
                key = f"{shard:01d}{i:05d}"
                sk = f"sk{shard}{i:03d}"
                img = Image.new("RGB", (256, 256), (40 * i % 256, 90, 160 - 20 * shard))
                d = ImageDraw.Draw(img)
                for j, (phrase, person) in enumerate(phrases):
                    box = [10 + 70 * j, 20, 70 + 70 * j, 200]
                    d.rectangle(box, fill=(200, 50 * j, 30))
                    start = caption.index(phrase)
                    dets.append({"sample_key": sk, "key": key, "shard": shard, "det_id": j, "phrase": phrase,
                                 "span_start": start, "span_end": start + len(phrase), "box": box, "score": 0.9 - 0.1 * j,
                                 "text_score": 0.5, "is_person": person, "head_box": [box[0] + 10, 22, box[0] + 50, 60] if person else None,
                                 "image_width": 256, "image_height": 256, "model": "hand"})
                buf = io.BytesIO()
                img.save(buf, "JPEG")
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(buf.getvalue())
                t.addfile(info, io.BytesIO(buf.getvalue()))
                emb = rng.normal(size=32)  # the tiny CLIP's width (text search in the browser test)
                row = {"sample_key": sk, "key": key, "shard": shard, "url": f"http://example.org/{key}.jpg",
                       "caption": caption.upper(), "clean_caption": caption, "width": 256, "height": 256,
                       "clip_score": 0.31 + 0.01 * i, "nsfw": 0.01, "face_count": 0, "phash": f"{i:016x}",
                       "source_row": i}
                scores.append({"sample_key": sk, "key": key, "clip_score": row["clip_score"], "width": 256, "height": 256,
                               "clip_image_embedding": (emb / np.linalg.norm(emb)).tolist()})
                selected.append(row)
            for i in range(2):  # rejected samples, for the ledger
                key = f"{shard:01d}{90 + i:05d}"
                hostile = shard == 1 and i == 1  # markup and a script URL from a stranger: shown as text, never run
                rejects.append({"sample_key": f"rj{shard}{i}", "shard": shard, "key": key,
                                "url": "javascript:document.title='pwned'" if hostile else f"http://example.org/{key}.jpg",
                                "caption": "a blurry <img src=x onerror=\"document.title='pwned'\"> photo" if hostile else "a blurry photo",
                                "failed": [{"rule": "min_clip_score", "value": "0.12", "threshold": "0.3"}],
                                "first_rule": "min_clip_score"})
                buf = io.BytesIO()
                Image.new("RGB", (200, 120), (90, 90, 90 + 50 * i)).save(buf, "JPEG")
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(buf.getvalue())
                t.addfile(info, io.BytesIO(buf.getvalue()))
                emb = rng.normal(size=32)  # the tiny CLIP's width (text search in the browser test)
                scores.append({"sample_key": f"rj{shard}{i}", "key": key, "clip_score": 0.12, "width": 200, "height": 120,
                               "clip_image_embedding": (emb / np.linalg.norm(emb)).tolist()})
        name = shard_name(shard)
        store.commit("download", shard, {f"images/{name}.tar": tar_path}, {"rows": len(plan)}, "hand")
        p = os.path.join(staging, "s.parquet")
        pq.write_table(pa.Table.from_pylist(scores), p)
        store.commit("score", shard, {f"scores/{name}.parquet": p}, {"rows": len(plan)}, "hand")
        p = os.path.join(staging, "d.parquet")
        pq.write_table(pa.Table.from_pylist(dets, schema=SCHEMA), p)
        store.commit("ground", shard, {f"detections/{name}.parquet": p}, {"rows": len(dets)}, "hand")
        store.discard(staging)
    staging = store.staging_dir("selected", 0)
    files = {}
    for rel, rows in (("selected/selected.parquet", selected), ("rejects/rejects.parquet", rejects)):
        files[rel] = os.path.join(staging, rel.replace("/", "_"))
        pq.write_table(pa.Table.from_pylist(rows), files[rel])
    store.commit("select", 0, files, {"selected": len(selected), "rejected": len(rejects)}, "hand")
    store.discard(staging)
    cfg = BuildConfig(min_crop_area=400, max_crop_fraction=0.9).model_dump()
    for shard in range(len(CROP_PLAN)):
        build_shard(shard, root, cfg, "hand", "jpg")
    return root


@pytest.fixture(scope="session")
def crops_dataset(tmp_path_factory):
    return write_crops_dataset(str(tmp_path_factory.mktemp("crops-ds") / "ds"))


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights in the released state-dict layout
    (95 MB: made once for the session), for FID / KID plumbing and hostile-weights tests."""
    from mmloom.testkit.tiny_scoring import make_random_inception

    return make_random_inception(str(tmp_path_factory.mktemp("inception") / "inception-random.pth"))

