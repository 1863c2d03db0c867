"""The score stage end to end: Ray actors holding tiny real-format models score downloaded
shards; columns carry model metadata; a crash mid-shard leaves nothing half-done."""

import glob

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import write_laion
from mmloom.curate.config import load_config
from mmloom.curate.download import download
from mmloom.curate.ingest import ingest
from mmloom.curate.score import STAGE_DEF, score, score_shard
from mmloom.errors import UserError
from mmloom.manifests.store import ShardStore

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def score_cfg(tmp_path_factory):
    from mmloom.testkit.tiny_scoring import make_score_models

    return make_score_models(str(tmp_path_factory.mktemp("models")))


@pytest.fixture()
def downloaded(tmp_path, server, images, score_cfg):
    urls = [server.url(f"/img/{images[i][0]}") for i in range(6)]
    src = write_laion(tmp_path / "m.parquet", [{"url": u, "text": images[i][2]} for i, u in enumerate(urls)]
                      + [{"url": server.url("/missing.jpg"), "text": "gone"}])
    cfg = load_config(None, {"ingest.shard_size": 3, "download.allow_private_addresses": True, "score": score_cfg})
    root = str(tmp_path / "ds")
    ingest([src], root, cfg, progress=False)
    download(root, cfg, progress=False)
    return root, cfg


@pytest.mark.slow
def test_score_stage_writes_one_row_per_image_with_model_metadata(downloaded):
    root, cfg = downloaded
    s = score(root, cfg, progress=False)
    assert s["committed"] == 3 and not s["failed"] and s["rows"] == 6
    df = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(f"{root}/scores/*.parquet"))])
    assert len(df) == 6 and df.sample_key.is_unique and df.score_error.isna().all()
    assert df.clip_score.between(-1, 1).all() and df.aesthetic.between(1, 10).all()
    assert df.nsfw.between(0, 1).all() and df.watermark.between(0, 1).all()
    assert (df.original_width > 0).all() and (df.width > 0).all() and df.phash.str.len().eq(16).all()
    assert len(df.clip_image_embedding.iloc[0]) == 32
    schema = pq.read_schema(sorted(glob.glob(f"{root}/scores/*.parquet"))[0])
    meta = {f.name: f.metadata for f in schema}
    assert meta["nsfw"][b"version"].startswith(b"nudenet")
    assert meta["clip_score"][b"model"].decode() == cfg.score.clip.model
    assert b"sha256:" in meta["watermark"][b"version"]
    assert score(root, cfg, progress=False)["ran"] == 0  # everything committed: a no-op


def test_missing_model_is_one_clear_error(downloaded):
    root, cfg = downloaded
    bad = load_config(None, {"score": {**cfg.score.model_dump(), "clip": {"model": "ViT-B-32/openai"}}})
    with pytest.raises(UserError) as e:
        score(root, bad, progress=False)
    assert "ViT-B-32/openai" in str(e.value) and "not available" in str(e.value)
    assert not ShardStore(root).committed_shards("score")


@pytest.mark.slow
def test_crash_mid_shard_then_rerun_scores_each_sample_once(downloaded, monkeypatch):
    from mmloom.curate.config import ScoreConfig
    from mmloom.filters.scoring import ScoreSet

    root, cfg = downloaded
    scorers = ScoreSet(ScoreConfig.model_validate({**cfg.score.model_dump(), "batch_size": 1}))
    real = scorers.score
    calls = {"n": 0}

    def dies_on_second_batch(images, captions):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("worker killed")
        return real(images, captions)

    monkeypatch.setattr(scorers, "score", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        score_shard(scorers, 0, root, STAGE_DEF.shard_hash(ShardStore(root), cfg, 0))
    store = ShardStore(root)
    assert not store.is_committed("score", 0) and not glob.glob(f"{root}/scores/*.parquet")
    # a crash after the data is in place but before the record: still not committed
    monkeypatch.setattr(scorers, "score", real)
    real_write = ShardStore.write_json_atomic

    def record_write_fails(self, path, obj):  # the journal is written, the record is not
        if path.endswith("/00001.json"):
            raise OSError("disk gone")
        return real_write(self, path, obj)

    monkeypatch.setattr(ShardStore, "write_json_atomic", record_write_fails)
    with pytest.raises(OSError):
        score_shard(scorers, 1, root, STAGE_DEF.shard_hash(ShardStore(root), cfg, 1))
    assert glob.glob(f"{root}/scores/00001.parquet") and not store.is_committed("score", 1)
    monkeypatch.undo()
    s = score(root, cfg, progress=False)
    # shard 1's files were in place with its journal: the rerun finishes that commit, and
    # scores the other two
    assert s["ran"] == 2 and store.is_committed("score", 1, verify_checksums=True)
    df = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(f"{root}/scores/*.parquet"))])
    assert len(df) == 6 and df.sample_key.is_unique


def test_worker_threads_make_the_same_scores_as_scoring_in_turn(downloaded):
    """With worker threads preparing the next batches (the GPU default), a shard's scores
    are the ones made in turn (the CPU default), row for row."""
    from mmloom.curate.config import ScoreConfig
    from mmloom.filters.scoring import ScoreSet

    root, cfg = downloaded
    scorers = ScoreSet(ScoreConfig.model_validate({**cfg.score.model_dump(), "batch_size": 1}))
    store = ShardStore(root)
    chash = STAGE_DEF.shard_hash(store, cfg, 0)
    tables = []
    for prefetch in (0, 2):
        store.uncommit("score", 0)
        score_shard(scorers, 0, root, chash, prefetch=prefetch)
        tables.append(pq.read_table(f"{root}/scores/00000.parquet"))
    assert tables[0].num_rows == 3
    assert tables[0].schema.equals(tables[1].schema, check_metadata=True)
    a, b = tables[0].to_pylist(), tables[1].to_pylist()
    for ra, rb in zip(a, b):
        for c in ra:
            if isinstance(ra[c], float):
                assert ra[c] == pytest.approx(rb[c], abs=1e-5), c
            elif c.endswith("_embedding"):
                assert ra[c] == pytest.approx(rb[c], abs=1e-5), c
            else:
                assert ra[c] == rb[c], c


def test_an_image_above_max_pixels_is_recorded_not_decoded(downloaded):
    """The stage checks each shard image's header against download.max_pixels before
    decoding (a shard may come from anywhere): such an image is a row with score_error."""
    from mmloom.curate.config import ScoreConfig
    from mmloom.filters.scoring import ScoreSet

    root, cfg = downloaded
    scorers = ScoreSet(ScoreConfig.model_validate(cfg.score.model_dump()))
    store = ShardStore(root)
    score_shard(scorers, 0, root, STAGE_DEF.shard_hash(store, cfg, 0), max_pixels=100)
    rows = pq.read_table(f"{root}/scores/00000.parquet").to_pylist()
    assert len(rows) == 3 and all("max_pixels 100" in r["score_error"] and r["clip_score"] is None for r in rows)
    assert STAGE_DEF.extra(store, cfg)["max_pixels"] == cfg.download.max_pixels

def _jpeg(im, **kw) -> bytes:
    import io

    b = io.BytesIO()
    im.save(b, "JPEG", **kw)
    return b.getvalue()


def test_decode_gives_pillows_pixels_for_every_kind_of_jpeg(pics, monkeypatch):
    """The score stage decodes JPEGs with OpenCV (one call without Python's lock, issue 16):
    the pixels must be Pillow's for every kind the download stage or a stranger's shard may
    hold; CMYK (which OpenCV converts otherwise), files cut short and other
    formats take Pillow's way (and a file cut short is refused, not grey-filled)."""
    import io

    import numpy as np
    from PIL import Image

    from mmloom import imageguard as S

    photo, other = pics["astronaut.jpg"], pics["coffee.jpg"].resize((301, 199))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: neither decoder applies it
    opencv = {
        "4:2:0 q75": _jpeg(photo, quality=75), "4:4:4 q95": _jpeg(other, quality=95, subsampling=0),
        "4:2:2": _jpeg(photo, quality=90, subsampling=1), "progressive": _jpeg(other, quality=85, progressive=True),
        "optimized": _jpeg(photo, optimize=True), "grey": _jpeg(photo.convert("L"), quality=90),
        "exif orientation": _jpeg(other, exif=exif), "odd size": _jpeg(photo.resize((33, 17))),
    }
    pillow = {"cmyk": _jpeg(photo.convert("CMYK"), quality=90), "png": _png(other),
              "bytes after the end marker": _jpeg(photo) + b"trailer"}
    calls = []
    real = S.open_image
    monkeypatch.setattr(S, "open_image", lambda d, m: calls.append(1) or real(d, m))
    for name, data in {**opencv, **pillow}.items():
        calls.clear()
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        got = S.decode_rgb(data, 10**8)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), want), name
        assert bool(calls) == (name in pillow), name
    cut = opencv["4:2:0 q75"][: len(opencv["4:2:0 q75"]) // 2]
    with pytest.raises(S.ImageRejected, match="truncated|undecodable"):
        S.decode_rgb(cut, 10**8)
    assert S.jpeg_frame(opencv["grey"]) == (8, 1, photo.height, photo.width) and S.jpeg_frame(pillow["cmyk"])[:2] == (8, 4)
    assert S.jpeg_frame(opencv["odd size"]) == (8, 3, 17, 33)
    assert S.jpeg_frame(b"\xff\xd8\xff\xda\x00\x02") is None and S.jpeg_frame(b"\xff\xd8\xff\xc0\x00") is None


def _png(im) -> bytes:
    import io

    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()

