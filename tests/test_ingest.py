import glob

import numpy as np
import pandas as pd
import pytest

from conftest import laion_table, write_laion
from mmloom.curate.config import load_config
from mmloom.curate.ingest import ingest, normalize_table, sample_key
from mmloom.errors import UserError
from mmloom.manifests.store import ShardStore

pytestmark = pytest.mark.usefixtures("ray_local")


def candidates(out) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(f"{out}/candidates/*.parquet"))], ignore_index=True)


def coyo_table(n=4):
    return pd.DataFrame({
        "id": np.arange(n, dtype="int64"), "url": [f"https://coyo.example/{i}.jpg" for i in range(n)],
        "text": [f"a coyo caption {i}" for i in range(n)], "width": [640] * n, "height": [480] * n,
        "image_phash": ["abcd"] * n, "text_length": [10] * n, "word_count": [3] * n,
        "num_tokens_bert": [5] * n, "num_tokens_gpt": [5] * n, "num_faces": [0] * n,
        "clip_similarity_vitb32": [0.35, 0.35, 0.1, 0.35], "clip_similarity_vitl14": [0.3] * n,
        "nsfw_score_opennsfw2": [0.01, 0.01, 0.01, 0.2], "nsfw_score_gantman": [0.02, 0.02, 0.02, 0.5],
        "watermark_score": [0.1] * n, "aesthetic_score_laion_v2": [5.1] * n,
    })


def test_laion_schema_normalized_with_keys_sources_and_statuses(tmp_path):
    rows = [
        {"url": "https://a.example/1.jpg", "text": "a dog"},
        {"url": "https://a.example/2.jpg", "text": "a cat", "width": 1000.0, "height": 400.0},  # aspect 2.5
        {"url": "https://a.example/3.jpg", "text": "tiny", "width": 100, "height": 100},  # area
        {"url": "https://a.example/4.jpg", "text": "nsfw", "punsafe": 0.9, "pwatermark": 0.95},
        {"url": None, "text": "no url"},
        {"url": "ftp://a.example/5.jpg", "text": "ftp"},
        {"url": "https://a.example/6.jpg", "text": None},
    ]
    src = write_laion(tmp_path / "laion.parquet", rows)
    s = ingest([src], str(tmp_path / "ds"), load_config(None), progress=False)
    assert s["formats"] == ["laion"] and s["input_rows"] == 7
    df = candidates(tmp_path / "ds").set_index("url", drop=False)
    assert df.loc["https://a.example/1.jpg", "status"] == "candidate"
    assert df.loc["https://a.example/1.jpg", "sample_key"] == sample_key("https://a.example/1.jpg", "a dog")
    assert "aspect 2.500 > 1.6667" in df.loc["https://a.example/2.jpg", "reason"]
    assert "area 10000 < 49152" in df.loc["https://a.example/3.jpg", "reason"]
    both = df.loc["https://a.example/4.jpg", "reason"]  # every failed rule is kept
    assert "nsfw 0.900 >= 0.3" in both and "watermark 0.950 >= 0.3" in both
    by_text = df.set_index("caption", drop=False)
    assert by_text.loc["no url", "status"] == "invalid" and by_text.loc["no url", "reason"] == "url is null"
    assert "scheme 'ftp'" in by_text.loc["ftp", "reason"]
    assert "caption (TEXT) is null" in df[df.caption.isna()].reason.iloc[0]
    # source columns are kept, prefixed, whatever their case
    assert {"src_url", "src_punsafe", "src_sample_id", "src_nsfw"} <= set(df.columns)
    assert s["status_counts"] == {"candidate": 1, "prefiltered": 3, "invalid": 3}


def test_case_insensitive_columns_and_aesthetic_variant(tmp_path):
    t = laion_table([{"url": "https://a.example/1.jpg"}]).rename(columns={"URL": "url", "TEXT": "Text", "AESTHETIC_SCORE": "aesthetic"})
    df = normalize_table(__import__("pyarrow").Table.from_pandas(t), "x.parquet", 0, load_config(None).ingest).to_pandas()
    assert df.source_format.iat[0] == "laion" and df.aesthetic_score.iat[0] == 5.0


def test_coyo_schema(tmp_path):
    coyo_table().to_parquet(tmp_path / "coyo.parquet")
    s = ingest([str(tmp_path / "coyo.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    df = candidates(tmp_path / "ds").set_index("src_id")
    assert s["formats"] == ["coyo"]
    assert df.loc[0, "status"] == "candidate" and df.loc[0, "clip_similarity"] == pytest.approx(0.35)
    assert "clip_similarity 0.100 < 0.3" in df.loc[2, "reason"]
    # COYO's NSFW is the max of its two detectors
    assert df.loc[3, "nsfw_score"] == pytest.approx(0.5) and "nsfw 0.500" in df.loc[3, "reason"]


def test_generic_table_by_flags_and_auto(tmp_path):
    pd.DataFrame({"image_link": ["https://g.example/a.jpg"], "alt": ["alt text"]}).to_parquet(tmp_path / "g.parquet")
    with pytest.raises(UserError, match="cannot detect"):
        ingest([str(tmp_path / "g.parquet")], str(tmp_path / "ds0"), load_config(None), progress=False)
    cfg = load_config(None, {"ingest.url_col": "IMAGE_LINK", "ingest.caption_col": "alt"})
    s = ingest([str(tmp_path / "g.parquet")], str(tmp_path / "ds"), cfg, progress=False)
    assert s["formats"] == ["generic"] and s["status_counts"] == {"candidate": 1}
    pd.DataFrame({"URL": ["https://g.example/b.jpg"], "Text": ["plain"]}).to_parquet(tmp_path / "h.parquet")
    s = ingest([str(tmp_path / "h.parquet")], str(tmp_path / "ds2"), load_config(None), progress=False)
    assert s["formats"] == ["generic"]


def test_missing_column_and_unreadable_file_write_nothing(tmp_path):
    good = write_laion(tmp_path / "good.parquet", [{"url": "https://a.example/1.jpg"}])
    laion_table([{"url": "x"}]).drop(columns=["TEXT"]).to_parquet(tmp_path / "notext.parquet")
    with pytest.raises(UserError) as e:
        ingest([good, str(tmp_path / "notext.parquet")], str(tmp_path / "ds"), load_config(None, {"ingest.format": "laion"}), progress=False)
    assert "notext.parquet" in str(e.value) and "'text'" in str(e.value)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError) as e:
        ingest([good, str(tmp_path / "broken.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    assert "broken.parquet" in str(e.value)
    assert not ShardStore(str(tmp_path / "ds")).committed_shards("ingest")
    assert not glob.glob(str(tmp_path / "ds" / "candidates" / "*.parquet"))
    with pytest.raises(UserError, match="not found"):
        ingest([str(tmp_path / "absent.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)


def test_non_numeric_sizes_are_row_statuses(tmp_path):
    t = laion_table([{"url": "https://a.example/1.jpg"}, {"url": "https://a.example/2.jpg"}])
    t["WIDTH"] = ["512", "wide"]
    t.to_parquet(tmp_path / "m.parquet")
    ingest([str(tmp_path / "m.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    df = candidates(tmp_path / "ds").set_index("url")
    assert df.loc["https://a.example/1.jpg", "status"] == "candidate" and df.loc["https://a.example/1.jpg", "width"] == 512
    assert df.loc["https://a.example/2.jpg", "status"] == "invalid"
    assert df.loc["https://a.example/2.jpg", "reason"] == "non-numeric WIDTH 'wide'"


def test_dedup_sharding_is_deterministic_and_prefilter_switchable(tmp_path):
    rows = [{"url": f"https://a.example/{i}.jpg", "text": f"c{i}", "punsafe": 0.9 if i % 5 == 0 else 0.0} for i in range(23)]
    a = write_laion(tmp_path / "a.parquet", rows)
    b = write_laion(tmp_path / "b.parquet", rows[:4] + [{"url": "https://b.example/x.jpg", "text": "new"}])
    cfg = load_config(None, {"ingest.shard_size": 5})
    s1 = ingest([a, b], str(tmp_path / "d1"), cfg, progress=False)
    ingest([str(tmp_path / "*.parquet")], str(tmp_path / "d2"), cfg, progress=False)
    assert s1["duplicates"] == 4 and s1["rows"] == 24 and s1["shards"] == 5
    c1, c2 = candidates(tmp_path / "d1"), candidates(tmp_path / "d2")
    pd.testing.assert_frame_equal(c1[["sample_key", "shard", "status"]], c2[["sample_key", "shard", "status"]])
    assert c1.sample_key.is_unique
    # eligible rows fill the first shards; the prefiltered ones come last
    first = c1[c1.shard < 3]
    assert (first.status == "candidate").all() and len(first) == 15
    assert (c1.groupby("shard").size() <= 5).all()
    # rerun is a no-op; other settings into the same directory are refused
    assert ingest([a, b], str(tmp_path / "d1"), cfg, progress=False).get("skipped")
    with pytest.raises(UserError, match="already ingested"):
        ingest([a], str(tmp_path / "d1"), cfg, progress=False)
    off = load_config(None, {"ingest.shard_size": 5})
    off.ingest.prefilter.max_nsfw = None
    s3 = ingest([a], str(tmp_path / "d3"), off, progress=False)
    assert s3["status_counts"] == {"candidate": 23}


def test_prefilter_missing_metadata_passes_and_thresholds_are_exact():
    """ingest's NULL policy (curate.rules.PREFILTER): a row without a score or size passes
    the rules that read it; values at a threshold fall on the documented side."""
    from mmloom.curate.ingest import prefilter_reasons

    nan = float("nan")
    df = pd.DataFrame({
        "width": [nan, 512.0, 512.0, 600.0, 512.0], "height": [nan, 512.0, 0.0, 1000.0, 512.0],
        "clip_similarity": [nan, 0.3, nan, 0.3, 0.29], "nsfw_score": [nan, 0.299, nan, 0.3, nan],
        "watermark_score": [nan, nan, nan, 0.3, nan], "aesthetic_score": [nan, 5.0, nan, 4.99, nan],
    })
    pf = load_config(None, {"ingest.prefilter.min_aesthetic": 5.0}).ingest.prefilter
    assert prefilter_reasons(df, pf) == [
        "", "",  # all missing; at the minimum thresholds (>=) and under the maximum ones
        "area 0 < 49152",  # a zero height has no aspect (the row is invalid anyway)
        "nsfw 0.300 >= 0.3; watermark 0.300 >= 0.3; aesthetic 4.99 < 5.0",  # aspect 0.6 is at the minimum
        "clip_similarity 0.290 < 0.3",
    ]
