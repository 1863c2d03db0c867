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
