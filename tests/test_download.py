import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pandas as pd
import pytest

from conftest import write_laion
from mmloom.curate.config import load_config
from mmloom.curate.download import download
from mmloom.curate.ingest import ingest
from mmloom.testkit.localserver import Route
from mmloom.manifests.store import ShardStore

pytestmark = pytest.mark.usefixtures("ray_local")


def statuses(root) -> pd.DataFrame:
    files = sorted(glob.glob(f"{root}/images/*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def tar_keys(root) -> list[str]:
    keys = []
    for t in sorted(glob.glob(f"{root}/images/*.tar")):
        with tarfile.open(t) as tf:
            keys += [m.name[:-4] for m in tf.getmembers() if m.name.endswith(".jpg")]
    return keys


def ingest_urls(tmp_path, urls, shard_size=4, **cfg_over):
    os.makedirs(tmp_path, exist_ok=True)
    src = write_laion(tmp_path / "meta.parquet", [{"url": u, "text": f"caption for {u}"} for u in urls])
    cfg = load_config(None, {"ingest.shard_size": shard_size, **cfg_over})
    root = str(tmp_path / "ds")
    ingest([src], root, cfg, progress=False)
    return root, cfg


def test_every_fault_ends_in_its_status(tmp_path, fault_server):
    srv, expected = fault_server
    urls = list(expected)
    root, cfg = ingest_urls(tmp_path, urls, **{
        "download.allow_private_addresses": True, "download.timeout": 1.5, "download.thread_count": 8})
    s = download(root, cfg, progress=False)
    assert not s["failed"] and s["committed"] == s["shards"]
    df = statuses(root).set_index("url")
    assert len(df) == len(urls) and df.index.is_unique
    for url, want in expected.items():
        assert df.loc[url, "status"] == want, (url, df.loc[url, "error_message"])
    assert "timed out" in df.loc[srv.url("/fault/hang.jpg"), "error_message"]
    assert "above max_pixels" in df.loc[srv.url("/fault/huge.png"), "error_message"]
    assert "Radiance HDR" in df.loc[srv.url("/fault/bomb.hdr"), "error_message"]
    assert "TIFF" in df.loc[srv.url("/fault/image.tiff"), "error_message"]
    assert "above max_body_bytes" in df.loc[srv.url("/fault/huge-body.jpg"), "error_message"]
    assert "X-Robots-Tag" in df.loc[srv.url("/fault/opt-out.jpg"), "error_message"]
    ok = df[df.status == "success"]
    assert (ok.original_width > 0).all() and (ok.width > 0).all() and ok.sha256.notna().all()
    assert sorted(tar_keys(root)) == sorted(ok.key)
    # the astronaut is 512x512: original size recorded, resized to 256
    astro = df.loc[srv.url("/img/astronaut.jpg")]
    assert (astro.original_width, astro.original_height, astro.width) == (512, 512, 256)
    assert s["status_counts"]["success"] == len(ok)


def test_private_addresses_refused_by_default_and_opt_out_can_be_ignored(tmp_path, fault_server):
    srv, expected = fault_server
    urls = [srv.url("/img/astronaut.jpg"), srv.url("/fault/opt-out.jpg")]
    root, cfg = ingest_urls(tmp_path, urls)
    download(root, cfg, progress=False)
    df = statuses(root)
    assert (df.status == "refused").all()
    assert df.error_message.str.contains("127.0.0.1 resolves to non-public address").all()
    assert tar_keys(root) == []
    root2, cfg2 = ingest_urls(tmp_path / "x", urls, **{"download.allow_private_addresses": True,
                                                        "download.disallowed_header_directives": []})
    download(root2, cfg2, progress=False)
    assert (statuses(root2).status == "success").all()


def test_retry_failed_refetches_only_failures_and_keeps_keys(tmp_path, server, images):
    flaky = server.add("/flaky.jpg", Route(b"down", 503, "text/plain"))
    urls = [server.url(f"/img/{images[i][0]}") for i in range(3)] + [flaky]
    root, cfg = ingest_urls(tmp_path, urls, shard_size=10, **{"download.allow_private_addresses": True})
    download(root, cfg, progress=False)
    before = statuses(root).set_index("url")
    assert before.loc[flaky, "status"] == "failed_to_download"
    keys_before = sorted(tar_keys(root))
    server.add("/flaky.jpg", Route(images[3][1]))
    s = download(root, cfg, progress=False)
    assert s["ran"] == 0  # plain rerun: everything committed, nothing redone
    s = download(root, cfg, retry_failed=True, progress=False)
    after = statuses(root).set_index("url")
    assert after.loc[flaky, "status"] == "success"
    assert after.loc[flaky, "key"] == before.loc[flaky, "key"]
    assert sorted(tar_keys(root)) == sorted(keys_before + [before.loc[flaky, "key"]])
    with tarfile.open(f"{root}/images/00000.tar") as tf:
        meta = json.loads(tf.extractfile(before.loc[flaky, "key"] + ".json").read())
    assert meta["key"] == before.loc[flaky, "key"] and meta["sample_key"] == after.loc[flaky, "sample_key"]


def test_damaged_shard_is_not_done_and_is_redone(tmp_path, server, images):
    urls = [server.url(f"/img/{images[i][0]}") for i in range(4)]
    root, cfg = ingest_urls(tmp_path, urls, shard_size=2, **{"download.allow_private_addresses": True})
    download(root, cfg, progress=False)
    store = ShardStore(root)
    assert store.committed_shards("download") == [0, 1]
    with open(f"{root}/images/00001.tar", "r+b") as f:
        f.truncate(1000)  # a damaged file no longer matches its completion record
    assert not store.is_committed("download", 1)
    s = download(root, cfg, progress=False)
    assert s["ran"] == 1 and store.is_committed("download", 1)
    assert len(tar_keys(root)) == 4


@pytest.mark.slow
def test_killed_download_rerun_has_every_sample_once(tmp_path, images):
    from mmloom.testkit.localserver import LocalServer

    with LocalServer({}) as srv:
        urls = []
        for i in range(24):
            name, data = images[i % len(images)][:2]
            urls.append(srv.add(f"/slow/{i}.jpg", Route(data, delay=0.4)))
        root, cfg = ingest_urls(tmp_path, urls, shard_size=3)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmloom", "download", root, "--allow-private-addresses", "--thread-count", "1", "--no-progress"],
            start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        store = ShardStore(root)
        deadline = time.time() + 600  # an event with a generous ceiling: a loaded machine starts Ray slowly
        while time.time() < deadline and not store.committed_shards("download"):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done_before = store.committed_shards("download")
        assert 1 <= len(done_before) < 8, "the kill should land mid-job"
        s = download(root, load_config(None, {"download.allow_private_addresses": True}), progress=False)
        assert s["ran"] == 8 - len(done_before)
    df = statuses(root)
    assert len(df) == 24 and df.sample_key.is_unique and set(df.url) == set(urls)
    assert (df.status == "success").all()
    keys = tar_keys(root)
    assert len(keys) == 24 and len(set(keys)) == 24


@pytest.mark.parametrize("mode", ["keep_ratio", "center_crop", "border", "keep_ratio_largest"])
def test_large_jpeg_decoded_at_reduced_scale_gives_img2dataset_output(mode, monkeypatch):
    """A JPEG much larger than the target is decoded by libjpeg at 1/2, 1/4 or 1/8 scale:
    the output has img2dataset's size, fields and format, and nearly its pixels; PNG,
    small JPEGs and the pixel-bomb check take their usual way."""
    import io

    import cv2
    import numpy as np
    from img2dataset.resizer import Resizer
    from PIL import Image

    from mmloom.curate.config import DownloadConfig
    from mmloom.curate.download import make_resizer
    from mmloom.testkit.demo_data import demo_images, jpeg_bytes, pixel_bomb

    photo = Image.open(io.BytesIO(demo_images()[0][1])).convert("RGB")
    big = photo.resize((1700, 1133), Image.BICUBIC)
    cfg = DownloadConfig.model_validate({"resize_mode": mode})
    ours = make_resizer(cfg)
    plain = Resizer(image_size=256, resize_mode=mode, resize_only_if_bigger=False, encode_quality=95, encode_format="jpg")
    flags = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, f: flags.append(f) or real(buf, f))
    for data, reduced in ((jpeg_bytes(big, 90), True), (jpeg_bytes(photo.resize((300, 200)), 90), False)):
        flags.clear()
        got, want = ours(io.BytesIO(data)), plain(io.BytesIO(data))
        assert got[5] is None and got[1:5] == want[1:5], (got[1:], want[1:])
        scaled = {getattr(cv2, f"IMREAD_REDUCED_COLOR_{r}") | cv2.IMREAD_IGNORE_ORIENTATION for r in (2, 4, 8)}
        assert (flags[0] in scaled) == reduced, flags
        a = np.asarray(Image.open(io.BytesIO(got[0])).convert("RGB"), np.float32)
        b = np.asarray(Image.open(io.BytesIO(want[0])).convert("RGB"), np.float32)
        assert Image.open(io.BytesIO(got[0])).format == "JPEG"
        assert 10 * np.log10(255**2 / np.mean((a - b) ** 2)) > 27  # PSNR in dB: the same picture (29 here)
    png = io.BytesIO()
    big.save(png, "PNG")
    flags.clear()
    assert ours(io.BytesIO(png.getvalue()))[1:5] == plain(io.BytesIO(png.getvalue()))[1:5]
    assert flags == [cv2.IMREAD_UNCHANGED, cv2.IMREAD_UNCHANGED]
    flags.clear()
    bomb = ours(io.BytesIO(pixel_bomb("JPEG")))
    assert bomb[0] is None and bomb[5].startswith("refused") and not flags  # refused on the header
