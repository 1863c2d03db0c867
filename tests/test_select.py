"""Selection SQL on hand-built manifests: thresholds, nulls, the reject ledger,
near-duplicates, dry runs, and re-selection without re-scoring."""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmloom.curate.config import load_config
from mmloom.errors import UserError
from mmloom.curate.select import select
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
    rng = np.random.default_rng(len(keys))
    sc["clip_image_embedding"] = [list(map(float, s.get("emb", rng.normal(size=8)))) for s in samples]  # far apart
    commit_frame(store, "score", "scores/00000.parquet", sc.drop(columns=list(drop_cols)), tmp_path)
    return root


def ledger(root):
    rej = pd.read_parquet(f"{root}/rejects/rejects.parquet")
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
    sel = pd.read_parquet(f"{root}/selected/selected.parquet")
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
    sel = set(pd.read_parquet(f"{root}/selected/selected.parquet").sample_key)
    assert sel == {"copy", "far"}
    led = ledger(root)
    assert led["orig"]["dedup_max_distance"][0] == "3 bits from copy"
    assert led["exact"]["dedup_max_distance"][0] == "3 bits from copy"
    assert set(led["rejected"]) == {"min_clip_score"}  # failed samples do not take part in dedup
    select(root, load_config(None, {"select.dedup_max_distance": 2}))
    assert set(pd.read_parquet(f"{root}/selected/selected.parquet").sample_key) == {"copy", "far", "orig"}


def test_semantic_duplicates_keep_the_best_of_each_cluster_with_a_ledger_line(tmp_path):
    """Embeddings at cosine >= the threshold form one cluster (found through the k-NN index,
    chained: a~b and b~c group a, b, c); the best clip score stays, the others fail
    semantic_dedup_threshold naming the kept sample; a sample failing a threshold rule or
    already dropped as a hash duplicate is not clustered."""
    rng = np.random.default_rng(1)
    u = rng.normal(size=8)
    v = rng.normal(size=8)
    w = rng.normal(size=8)
    rows = [{"key": "a", "emb": u, "clip_score": 0.35}, {"key": "b", "emb": u + 0.05 * v, "clip_score": 0.40},
            {"key": "c", "emb": u + 0.1 * v, "clip_score": 0.33}, {"key": "d", "emb": w, "clip_score": 0.31},
            {"key": "low", "emb": u, "clip_score": 0.1}]
    root = make_dataset(tmp_path, rows)
    f = select(root, load_config(None, {"select.semantic_dedup_threshold": 0.99}))
    assert set(pd.read_parquet(f"{root}/selected").sample_key) == {"b", "d"}
    led = ledger(root)
    assert led["a"]["semantic_dedup_threshold"][0].endswith("to b") and led["a"]["semantic_dedup_threshold"][1] == "0.99"
    assert led["c"]["semantic_dedup_threshold"][0].startswith("cosine 0.9")
    assert set(led["low"]) == {"min_clip_score"}
    assert {r["rule"]: r["first_failure"] for r in f["rules"]}["semantic_dedup_threshold"] == 2
    assert select(root, load_config(None, {"select": {"semantic_dedup_threshold": None}}))["selected"] == 4
    # without stored embeddings the rule cannot run: one line saying what to do
    (tmp_path / "noemb").mkdir()
    root2 = make_dataset(tmp_path / "noemb", rows, drop_cols=["clip_image_embedding"])
    with pytest.raises(UserError, match="semantic_dedup_threshold needs.*clip_image_embedding"):
        select(root2, load_config(None))


def test_dry_run_writes_nothing(tmp_path):
    root = make_dataset(tmp_path, [{"key": "a"}, {"key": "b", "clip_score": 0.1}])
    f = select(root, load_config(None), dry_run=True)
    assert f["selected"] == 1 and "SELECT" in f["sql"]
    assert not os.path.exists(f"{root}/selected") or not os.listdir(f"{root}/selected")
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


# -- the rule table (curate/rules.py): one definition, two compilers -----------------

def _only(use, key, t):
    """A config section with one rule of ``use`` switched on."""
    from types import SimpleNamespace

    return SimpleNamespace(**{k: (t if k == key else None) for k in use.rules})


def _rule_frame(use, n=400, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    grid = {"width": [0, 100, 300, 500, 512, 1000], "height": [0, 100, 300, 512, 1000],
            "clip_similarity": [0.1, 0.3, 0.31], "nsfw": [0.0, 0.3, 0.31], "watermark": [0.0, 0.3, 0.9],
            "aesthetic": [4.5, 5.0, 5.5], "face_count": [0, 1, 2]}
    cols = {}
    for field, column in use.columns.items():
        v = rng.choice(np.array(grid[field], dtype="float64"), n)
        v[rng.random(n) < 0.15] = np.nan
        cols[column] = v
    return pd.DataFrame(cols)


@pytest.mark.parametrize("null", ["passes", "fails"])
@pytest.mark.parametrize("use_name", ["PREFILTER", "SELECT"])
def test_each_rule_compiles_the_same_to_pandas_and_sql(use_name, null):
    """Every rule of each use fails exactly the same rows in pandas and in DuckDB, under
    either NULL policy (missing values, zero heights and values at the threshold included)."""
    import duckdb

    from mmloom.curate import rules as R

    use = getattr(R, use_name)
    df = _rule_frame(use)
    con = duckdb.connect()
    con.register("t", pa.Table.from_pandas(df, preserve_index=False))  # NaN -> NULL
    thresholds = {"min_aspect": 0.6, "max_aspect": 1.6667, "min_area": 90000, "min_clip_similarity": 0.3,
                  "min_clip_score": 0.3, "max_nsfw": 0.3, "max_watermark": 0.3, "min_aesthetic": 5.0,
                  "min_side": 512, "max_people": 1}
    for key in use.rules:
        cfg = _only(use, key, thresholds[key])
        in_pandas = [bool(r) for r in R.failure_reasons(use, cfg, df, null)]
        (sql,) = R.sql_rules(use, cfg, null)
        in_sql = [not p for (p,) in con.execute(f"SELECT {sql.passes} FROM t").fetchall()]
        assert in_pandas == in_sql, key
        assert 0 < sum(in_sql) < len(df), key  # the data exercises the rule both ways
        missing = df[[use.columns[f] for f in use.rules[key].measure.fields]].isna().any(axis=1)
        assert all(in_sql[i] == (null == "fails") for i in missing[missing].index), key


def test_rule_table_covers_every_threshold_and_shares_six_rules():
    from mmloom.curate import rules as R
    from mmloom.curate.config import PrefilterConfig, SelectConfig

    assert list(R.PREFILTER.rules) == list(PrefilterConfig.model_fields)
    assert set(R.SELECT.rules) | set(R.GROUP_RULES) == set(SelectConfig.model_fields) - {"require_clean_caption", "semantic_dedup_neighbors"}
    shared = [k for k, r in R.PREFILTER.rules.items() if r in R.SELECT.rules.values()]
    assert shared == ["min_aspect", "max_aspect", "min_area", "min_clip_similarity", "max_nsfw", "max_watermark"]
    assert R.PREFILTER.rules["min_clip_similarity"] is R.SELECT.rules["min_clip_score"]
    assert (R.PREFILTER.null, R.SELECT.null) == ("passes", "fails")  # stated per use


def test_rule_sql_holds_no_pasted_text(tmp_path):
    """Columns are quoted identifiers and thresholds floats made by the compiler: an odd
    column name reads as a name, a non-finite threshold as a number, a text threshold is refused."""
    import duckdb

    from mmloom.curate import rules as R

    odd = 'x"); DROP TABLE t; --'
    use = R.Use("t", {"min_x": R.Rule(R.Measure("x", "column", ("x",)), ">=")}, {"x": odd}, "fails")
    con = duckdb.connect()
    con.execute(f"CREATE TABLE t AS SELECT * FROM (VALUES (1.0), (NULL), ('inf'::DOUBLE)) v({R.ident(odd)})")
    for t, want in [(0.5, [True, False, True]), (float("inf"), [False, False, True]), (float("-inf"), [True, False, True])]:
        (sql,) = R.sql_rules(use, _only(use, "min_x", t))
        assert [p for (p,) in con.execute(f"SELECT {sql.passes} FROM t").fetchall()] == want
    assert con.execute("SELECT count(*) FROM t").fetchall() == [(3,)]
    with pytest.raises(TypeError, match="t.min_x: a threshold must be a number"):
        R.sql_rules(use, _only(use, "min_x", "0.5 OR true"))


def test_a_dataset_selected_before_the_table_folders_moves_on_without_regrounding(tmp_path):
    """selection/ of the old layout is removed when select writes selected/ and rejects/;
    the ground stage hashes the selection under its old file names, so unchanged
    selections do not redo grounding."""
    from mmloom.curate.ground import _inputs

    root = make_dataset(tmp_path, [{"key": "a"}, {"key": "b", "clip_score": 0.1}])
    os.makedirs(f"{root}/selection")
    for name in ("selected.parquet", "rejects.parquet"):
        open(f"{root}/selection/{name}", "wb").close()
    select(root, load_config(None))
    assert not os.listdir(f"{root}/selection")
    assert sorted(_inputs(ShardStore(root), 0)["selection"]) == ["selection/rejects.parquet", "selection/selected.parquet"]
