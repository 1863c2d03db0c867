"""Hostile metadata at ingest (issue 14 items 1, 8 and 9): column names that try SQL,
output directories with quotes and brackets, real pandas-written LAION files, column
types that differ between files, binary url/caption columns, and corrupt committed
parquet files met by `query`, `stats` and `select`."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmloom.curate.config import load_config
from mmloom.curate.ingest import ingest, sample_key
from mmloom.curate.sources import src_columns
from mmloom.errors import UserError

pytestmark = pytest.mark.usefixtures("ray_local")

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
SRC_NAME = re.compile(r"^src_[a-z0-9_]+$")


def candidates(out) -> pd.DataFrame:
    files = sorted(os.path.join(out, "candidates", f) for f in os.listdir(os.path.join(out, "candidates")) if f.endswith(".parquet"))
    return pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)


def mmloom(*args):
    return subprocess.run([sys.executable, "-m", "mmloom", *map(str, args)], capture_output=True, text=True, timeout=300)


def urls(n, host="h.example"):
    return [f"https://{host}/{i}.jpg" for i in range(n)]


# -- item 1: SQL from column names -------------------------------------------------------

def test_column_name_cannot_run_sql(tmp_path):
    """The issue's attack: a column name closing the identifier in ingest's COPY and
    appending a COPY of its own (lowercase, as ingest lowercased names)."""
    target = tmp_path / "pwned.csv"
    evil = f'url" from sharded) to \'{target}\' (format csv); copy (select shard, "src_url'
    t = pa.table({"URL": urls(3), "TEXT": ["a", "b", "c"], evil: ["x", "y", "z"]})
    pq.write_table(t, tmp_path / "m.parquet")
    s = ingest([str(tmp_path / "m.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    assert not target.exists()
    assert s["rows"] == 3
    df = candidates(tmp_path / "ds")
    mapped = dict(zip(t.column_names, src_columns(t.column_names)))
    assert SRC_NAME.match(mapped[evil]) and mapped[evil] != "src_url"
    assert sorted(df[mapped[evil]]) == ["x", "y", "z"] and sorted(df.src_url) == sorted(urls(3))


HOSTILE_NAMES = [
    'quo"te', "sin'gle", 'both"\'', "semi;colon; DROP TABLE raw;", "new\nline", "dash -- comment",
    "ünïcödé", "名前", "nul\x00byte", "L" * 10_240, "url", "Url", "sp ace", "", "src_url", "*",
]


def test_hostile_column_names_follow_the_mapping(tmp_path):
    n = 4
    cols = {"URL": urls(n), "TEXT": [f"caption {i}" for i in range(n)]}
    for j, name in enumerate(HOSTILE_NAMES):
        cols[name] = [f"{j}:{i}" for i in range(n)]
    pq.write_table(pa.table(cols), tmp_path / "m.parquet")
    s = ingest([str(tmp_path / "m.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    assert s["rows"] == n and s["status_counts"] == {"candidate": n}
    df = candidates(tmp_path / "ds").sort_values("source_row").reset_index(drop=True)
    names = list(cols)
    mapped = src_columns(names)
    assert len(set(mapped)) == len(mapped), "two source columns share a name"
    for name, m in zip(names, mapped):
        assert SRC_NAME.match(m) and len(m) <= 80, (name[:40], m)
        assert df[m].tolist() == cols[name], f"{name[:40]!r} -> {m}: values lost or overwritten"
    # the documented mapping: a plain name is lowercased; the first of URL/url keeps src_url
    assert mapped[:2] == ["src_url", "src_text"]
    for name in ("url", "Url", "src_url"):
        assert mapped[names.index(name)] != "src_url"
    # no source column appears twice or under its raw name
    assert not [c for c in df.columns if c.startswith("src_") and c not in mapped]


def test_undetectable_file_with_hostile_names_is_one_short_line(tmp_path):
    pq.write_table(pa.table({"a\nb": [1], "L" * 10_240: [2]}), tmp_path / "odd.parquet")
    with pytest.raises(UserError) as e:
        ingest([str(tmp_path / "odd.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    msg = str(e.value).splitlines()[-1]  # "ingest stopped, nothing was written:" then one line per file
    assert "odd.parquet" in msg and "cannot detect" in msg and len(msg) < 1000


def test_src_mapping_is_stable_across_files(tmp_path):
    """The same odd name in two files lands in one column; different odd names never merge."""
    a = pa.table({"URL": urls(2, "a"), "TEXT": ["a0", "a1"], "a b": ["1", "2"], 'quo"te': ["q", "r"]})
    b = pa.table({"URL": urls(2, "b"), "TEXT": ["b0", "b1"], "a-b": ["3", "4"], 'quo"te': ["s", "t"]})
    pq.write_table(a, tmp_path / "a.parquet")
    pq.write_table(b, tmp_path / "b.parquet")
    ingest([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    df = candidates(tmp_path / "ds").sort_values(["source_file", "source_row"])
    ma, mb = src_columns(a.column_names), src_columns(b.column_names)
    assert ma[3] == mb[3] and df[ma[3]].tolist() == ["q", "r", "s", "t"]
    assert ma[2] != mb[2]
    assert df[ma[2]].tolist()[:2] == ["1", "2"] and df[mb[2]].tolist()[2:] == ["3", "4"]


def test_output_directory_with_quotes_and_brackets(tmp_path):
    out = tmp_path / "we'ird [dir] \"x\" *?"
    src = tmp_path / "in [1]'s.parquet"
    pq.write_table(pa.table({"URL": urls(3), "TEXT": ["a", "b", "c"]}), src)
    s = ingest([str(src)], str(out), load_config(None, {"ingest.shard_size": 2}), progress=False)
    assert s["rows"] == 3 and s["shards"] == 2
    assert len(candidates(out)) == 3
    r = mmloom("query", out, "SELECT count(*) AS n FROM candidates", "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["n", "3"]
    r = mmloom("stats", out, "--json")
    assert r.returncode == 0, r.stderr
    assert '"metadata_rows": 3' in r.stdout


# -- item 9: real metadata files -------------------------------------------------------------

def test_real_laion_file_written_by_pandas(tmp_path):
    src = os.path.join(DATA, "laion-1000.parquet")
    assert "__index_level_0__" in pq.read_schema(src).names
    s = ingest([src], str(tmp_path / "ds"), load_config(None, {"ingest.shard_size": 300}), progress=False)
    raw = pd.read_parquet(src)
    assert s["formats"] == ["laion"]
    assert s["input_rows"] == 1000
    assert s["rows"] == 1000 - raw.duplicated(["URL", "TEXT"]).sum()
    df = candidates(tmp_path / "ds")
    assert len(df) == s["rows"] and s["shards"] == 4
    assert {"src_url", "src_text"} <= set(df.columns)
    # pandas' unnamed index is pandas bookkeeping, not a metadata column (source_row keeps the order)
    assert not [c for c in df.columns if "index_level" in c]
    first = df.sort_values("source_row").iloc[0]
    assert first.url == raw.URL.iloc[0].strip() and first.caption == raw.TEXT.iloc[0]


def test_named_pandas_index_is_kept_as_a_column(tmp_path):
    df = pd.DataFrame({"URL": urls(2), "TEXT": ["a", "b"], "sample": [7, 9]}).set_index("sample")
    df.to_parquet(tmp_path / "m.parquet")  # index "sample" stored as a column
    ingest([str(tmp_path / "m.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    assert sorted(candidates(tmp_path / "ds").src_sample) == [7, 9]


def test_column_type_differs_between_files(tmp_path):
    a = pa.table({"URL": urls(2, "a"), "TEXT": ["a0", "a1"], "extra": [1, 2], "tags": ["x", "y"], "n": [1, 2]})
    b = pa.table({"URL": urls(2, "b"), "TEXT": ["b0", "b1"], "extra": [[1, 2], [3]],
                  "tags": pa.array([{"k": 1}, {"k": 2}]), "n": [1.5, 2.5]})
    pq.write_table(a, tmp_path / "a.parquet")
    pq.write_table(b, tmp_path / "b.parquet")
    s = ingest([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    assert s["rows"] == 4
    df = candidates(tmp_path / "ds").sort_values(["source_file", "source_row"])
    # a list in one file and a number in the other: both kept, as text
    assert df.src_extra.tolist() == ["1", "2", "[1, 2]", "[3]"]
    assert df.src_tags.tolist()[:2] == ["x", "y"] and "1" in df.src_tags.iloc[2]
    # numbers of two widths are numbers
    assert df.src_n.tolist() == [1.0, 2.0, 1.5, 2.5]
    assert "src_extra" in s["retyped_columns"] and "a.parquet" in s["retyped_columns"]["src_extra"]
    assert "b.parquet" in s["retyped_columns"]["src_extra"]


def test_binary_url_and_caption_columns(tmp_path):
    t = pa.table({
        "URL": pa.array([b"https://b.example/1.jpg", b"https://b.example/2.jpg", b"https://b.example/3.jpg",
                         b"https://b.example/\xff.jpg", b"https://b.example/5.jpg", b"https://b.example/5.jpg"], pa.binary()),
        "TEXT": pa.array(["a dog".encode(), "a cat".encode(), "caf\u00e9".encode(), b"fine", b"bad \xfe\xff",
                          b"bad \xfe\xfe"], pa.binary()),
        "other": pa.array([b"\x00", b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"], pa.binary()),
    })
    pq.write_table(t, tmp_path / "m.parquet")
    s = ingest([str(tmp_path / "m.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    assert s["rows"] == 6 and s["duplicates"] == 0  # distinct binary values stay distinct
    df = candidates(tmp_path / "ds").set_index("source_row")
    assert df.loc[0, "status"] == "candidate" and df.loc[0, "caption"] == "a dog"
    assert df.loc[0, "sample_key"] == sample_key("https://b.example/1.jpg", "a dog")
    assert df.loc[2, "caption"] == "caf\u00e9" and df.loc[2, "status"] == "candidate"
    assert df.loc[3, "status"] == "invalid" and "URL" in df.loc[3, "reason"] and "UTF-8" in df.loc[3, "reason"]
    assert df.loc[4, "status"] == "invalid" and "TEXT" in df.loc[4, "reason"] and "UTF-8" in df.loc[4, "reason"]
    assert df.loc[4, "url"] == "https://b.example/5.jpg"
    assert df.loc[4, "src_text"] == b"bad \xfe\xff" and df.loc[5, "src_text"] == b"bad \xfe\xfe"  # raw bytes kept
    assert df.loc[5, "status"] == "invalid"
    assert df.sample_key.is_unique


def test_invalid_utf8_in_a_string_column_stays_bytes(tmp_path):
    """A file whose string column holds bytes that are not UTF-8 (pyarrow does not check on
    write): ingest keeps them as bytes instead of failing in DuckDB."""
    bad = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(b"\x00\x00\x00\x00\x02\x00\x00\x00\x04\x00\x00\x00"),
                                                 pa.py_buffer(b"ok\xff\xfe")])
    t = pa.table({"URL": urls(2), "TEXT": ["a", "b"], "note": bad})
    pq.write_table(t, tmp_path / "m.parquet")
    s = ingest([str(tmp_path / "m.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    assert s["status_counts"] == {"candidate": 2}
    df = candidates(tmp_path / "ds").set_index("source_row")
    assert df.loc[0, "src_note"] == b"ok" and df.loc[1, "src_note"] == b"\xff\xfe"


# -- item 8 (reader part): corrupt committed parquet ----------------------------------------

@pytest.fixture()
def scored(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from test_select import make_dataset

    return make_dataset(tmp_path, [{"key": f"k{i}", "clip_score": 0.2 + i / 10} for i in range(6)])


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def scramble_pages(path):
    """Keep the footer; overwrite the page headers of the columns every command reads."""
    md = pq.read_metadata(path)
    data = bytearray(open(path, "rb").read())
    for name in ("clip_score", "score_error"):
        off = md.row_group(0).column(md.schema.names.index(name)).data_page_offset
        for j in range(off, min(off + 16, len(data))):
            data[j] = 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", [truncate, scramble_pages])
def test_corrupt_scores_parquet_is_one_line_naming_the_file(scored, damage):
    bad = os.path.join(scored, "scores", "00000.parquet")
    damage(bad)
    for args in (["query", scored, "SELECT count(*), sum(clip_score), count(score_error) FROM scores"],
                 ["stats", scored], ["select", scored]):
        r = mmloom(*args)
        if damage is scramble_pages and args[0] == "stats" and r.returncode == 0:
            continue  # stats counts from the footer's statistics and never reads those pages
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        msg = r.stderr.strip()
        assert "\n" not in msg and bad in msg, (args, msg)


def test_corrupt_candidates_named_by_open_dataset(tmp_path):
    pq.write_table(pa.table({"URL": urls(3), "TEXT": ["a", "b", "c"]}), tmp_path / "m.parquet")
    ingest([str(tmp_path / "m.parquet")], str(tmp_path / "ds"), load_config(None), progress=False)
    bad = glob.glob(str(tmp_path / "ds" / "candidates" / "*.parquet"))[0]
    truncate(bad)
    from mmloom.manifests.views import open_dataset

    with pytest.raises(UserError) as e:
        open_dataset(str(tmp_path / "ds"))
    assert bad in str(e.value) and "\n" not in str(e.value)

