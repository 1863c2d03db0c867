"""Selection SQL on hand-built manifests: thresholds, nulls, the reject ledger,
near-duplicates, dry runs, and re-selection without re-scoring."""

import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmloom.curate.config import load_config
from mmloom.errors import UserError
from mmloom.filters.select import select
from mmloom.manifests.store import ShardStore


def commit_frame(store, stage, rel, df, tmp):
    p = os.path.join(tmp, rel.replace("/", "_"))
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), p)
    store.commit(stage, 0, {rel: p}, {"rows": len(df)}, "test")


def make_dataset(tmp_path, samples: list[dict], drop_cols=()):
    """samples: dicts of score values keyed by name; every sample downloaded fine."""
    root = str(tmp_path / "ds")
    store = ShardStore(root)
    n = len(samples)
    keys = [s.get("key", f"k{i:02d}") for i, s in enumerate(samples)]
    cand = pd.DataFrame({
        "sample_key": keys, "url": [f"http://x/{k}.jpg" for k in keys], "caption": [s.get("caption", "a dog") for s in samples],
        "width": 512.0, "height": 512.0, "clip_similarity": 0.35, "nsfw_score": 0.0, "watermark_score": 0.0,
        "aesthetic_score": 5.0, "source_format": "laion", "source_file": "m.parquet", "source_row": range(n),
        "status": "candidate", "reason": "", "shard": 0,
    })
    commit_frame(store, "ingest", "candidates/00000.parquet", cand, tmp_path)
    dl = pd.DataFrame({
        "sample_key": keys, "key": [f"{i:09d}" for i in range(n)], "url": cand.url, "caption": cand.caption,
        "status": "success", "error_message": None,
        "width": 256, "height": 256,
        "original_width": [s.get("ow", 512) for s in samples], "original_height": [s.get("oh", 512) for s in samples],
        "sha256": "x",
    })
    commit_frame(store, "download", "images/00000.parquet", dl, tmp_path)
    defaults = {"clip_score": 0.35, "nsfw": 0.01, "watermark": 0.01, "aesthetic": 6.0, "face_count": 0,
                "caption_reason": None, "clean_caption": "a dog", "score_error": None, "phash": None, "phash_int": None}
    sc = pd.DataFrame([{**defaults, **{k: v for k, v in s.items() if k in defaults}} for s in samples])
    sc.insert(0, "sample_key", keys)
    sc.insert(1, "key", dl.key)
    sc["original_width"], sc["original_height"] = dl.original_width, dl.original_height
    sc = sc.astype({"clip_score": "float32", "nsfw": "float32", "watermark": "float32", "aesthetic": "float32",
                    "face_count": "Int32", "phash_int": "Int64", "phash": "string", "caption_reason": "string",
                    "score_error": "string"})
    commit_frame(store, "score", "scores/00000.parquet", sc.drop(columns=list(drop_cols)), tmp_path)
    return root


def ledger(root):
    rej = pd.read_parquet(f"{root}/selection/rejects.parquet")
    return {r.sample_key: {f["rule"]: (f["value"], f["threshold"]) for f in r.failed} for r in rej.itertuples()}


def test_thresholds_nulls_and_ledger(tmp_path):
    root = make_dataset(tmp_path, [
        {"key": "good"},
        {"key": "lowclip", "clip_score": 0.29},
        {"key": "edgeclip", "clip_score": 0.30},  # at the threshold: passes (>=)
        {"key": "nsfw_at", "nsfw": 0.3},  # at the threshold: fails (must be below)
        {"key": "many", "clip_score": 0.1, "watermark": 0.9, "ow": 1000, "oh": 300},
        {"key": "nullclip", "clip_score": None},
        {"key": "nullnsfw", "nsfw": None},
        {"key": "emptycap", "caption_reason": "caption is empty after cleaning", "clean_caption": ""},
        {"key": "broken", "score_error": "cannot decode", "clip_score": None},
        {"key": "small", "ow": 200, "oh": 200},
    ])
    f = select(root, load_config(None))
    sel = pd.read_parquet(f"{root}/selection/selected.parquet")
    assert sorted(sel.sample_key) == ["edgeclip", "good"]
    led = ledger(root)
    assert set(led) == {"lowclip", "nsfw_at", "many", "nullclip", "nullnsfw", "emptycap", "broken", "small"}
    assert led["lowclip"] == {"min_clip_score": ("0.29", "0.3")}
    assert set(led["many"]) == {"min_clip_score", "max_watermark", "max_aspect"}
    assert led["many"]["max_aspect"][0].startswith("3.33")
    assert led["nullclip"]["min_clip_score"] == ("NULL", "0.3")  # a missing score is never selected silently
    assert led["nullnsfw"] == {"max_nsfw": ("NULL", "0.3")}
    assert "require_clean_caption" in led["emptycap"] and "scorable" in led["broken"]
    assert led["small"] == {"min_area": ("40000", "49152.0")}
    assert f["selected"] == 2 and f["rejected"] == 8
    by_rule = {r["rule"]: r for r in f["rules"]}
    assert by_rule["min_clip_score"]["fails"] == 4  # lowclip, many, nullclip, broken


def test_optional_rules_and_reselect_without_rescoring(tmp_path):
    root = make_dataset(tmp_path, [
        {"key": "a", "aesthetic": 4.9}, {"key": "b", "face_count": 2}, {"key": "c", "ow": 600, "oh": 500},
    ])
    assert select(root, load_config(None))["selected"] == 3  # off by default
    cfg = load_config(None, {"select.min_aesthetic": 5, "select.max_people": 1, "select.min_side": 512})
    select(root, cfg)
    led = ledger(root)
    assert led == {"a": {"min_aesthetic": ("4.9", "5.0")}, "b": {"max_people": ("2", "1")},
                   "c": {"min_side": ("500", "512")}}


def test_near_duplicates_keep_best_clip_score(tmp_path):
    base = 0x0F0F0F0F0F0F0F0F
    signed = lambda v: v - 2**64 if v >= 2**63 else v  # noqa: E731
    rows = []
    for key, val, clip in [("orig", base, 0.33), ("copy", base ^ 0b1011, 0.40), ("far", base ^ 0xFFFFFFFF00000000, 0.35),
                           ("exact", base, 0.31), ("rejected", base, 0.1)]:
        rows.append({"key": key, "phash": f"{val:016x}", "phash_int": signed(val), "clip_score": clip})
    root = make_dataset(tmp_path, rows)
    select(root, load_config(None))
    sel = set(pd.read_parquet(f"{root}/selection/selected.parquet").sample_key)
    assert sel == {"copy", "far"}
    led = ledger(root)
    assert led["orig"]["dedup_max_distance"][0] == "3 bits from copy"
    assert led["exact"]["dedup_max_distance"][0] == "3 bits from copy"
    assert set(led["rejected"]) == {"min_clip_score"}  # failed samples do not take part in dedup
    select(root, load_config(None, {"select.dedup_max_distance": 2}))
    assert set(pd.read_parquet(f"{root}/selection/selected.parquet").sample_key) == {"copy", "far", "orig"}


def test_dry_run_writes_nothing(tmp_path):
    root = make_dataset(tmp_path, [{"key": "a"}, {"key": "b", "clip_score": 0.1}])
    f = select(root, load_config(None), dry_run=True)
    assert f["selected"] == 1 and "SELECT" in f["sql"]
    assert not os.path.exists(f"{root}/selection") or not os.listdir(f"{root}/selection")
    assert not ShardStore(root).committed_shards("select")


def test_rule_without_its_score_is_a_clear_error(tmp_path):
    root = make_dataset(tmp_path, [{"key": "a"}], drop_cols=("watermark",))
    with pytest.raises(UserError, match="select.max_watermark needs the score column"):
        select(root, load_config(None))
    cfg = load_config(None, {"select": {"max_watermark": None}})
    assert select(root, cfg)["selected"] == 1


def test_views_samples_and_rejects(tmp_path):
    from mmloom.manifests.views import open_dataset, view_names

    root = make_dataset(tmp_path, [{"key": "a"}, {"key": "b", "clip_score": 0.1}])
    select(root, load_config(None))
    con = open_dataset(root)
    assert {"candidates", "downloads", "scores", "samples", "selected", "rejects"} <= set(view_names(con))
    row = con.execute("SELECT ingest_status, download_status, clip_score FROM samples WHERE sample_key='b'").fetchall()
    assert row[0][0] == "candidate" and row[0][1] == "success" and row[0][2] == pytest.approx(0.1)
    assert con.execute("SELECT first_rule FROM rejects").fetchall() == [("min_clip_score",)]
