"""`mmloom ingest`: metadata parquet -> candidates/ shards.

Per input file (a Ray task): detect the schema, normalize to the candidates schema,
give each row its stable sample key, validate rows and apply the metadata prefilters.
Then, globally, DuckDB drops exact url+caption duplicates and assigns rows to shards of
``shard_size`` deterministically (eligible rows first, in file and row order), and each
shard is committed atomically. Rows never disappear silently: invalid and prefiltered
rows stay with a status and reason; duplicates are counted in the summary.
"""

from __future__ import annotations

import hashlib
import json
import os

import duckdb
import fsspec
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import IngestConfig, PipelineConfig
from .rules import PREFILTER, failure_reasons
from .runner import Resources, run_shards
from .sources import detect, pandas_index_columns, src_columns
from mmloom.errors import UserError
from ..manifests import schemas as S
from ..manifests.store import ShardStore, config_hash, shard_name

STAGE = "ingest"
OUT_DIR = S.STAGE_DIRS[STAGE]


def sample_key(url: str, caption: str) -> str:
    """Stable across reruns and re-downloads: 128-bit hash of url and raw caption."""
    return hashlib.blake2b(f"{url}\x1f{caption}".encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def expand_sources(sources: list[str]) -> list[str]:
    """Files, folders (every .parquet below) and globs, local or fsspec URLs (s3://...)."""
    files: list[str] = []
    for s in sources:
        fs, path = fsspec.core.url_to_fs(s)
        remote = "://" in s
        name = (lambda p: fs.unstrip_protocol(p)) if remote else os.path.abspath
        if fs.isdir(path):  # a name that exists is itself, even with * ? [ in it
            hits = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
            if not hits:
                raise UserError(f"directory {s} holds no .parquet file")
        elif fs.exists(path):
            hits = [path]
        elif any(ch in s for ch in "*?["):
            hits = sorted(fs.glob(path))
            if not hits:
                raise UserError(f"no file matches {s!r}")
        else:
            raise UserError(f"input file not found: {s}")
        files += [name(h) for h in hits]
    return list(dict.fromkeys(files))


def _numeric(df: pd.DataFrame, cols: list[str], field: str, bad: list[str | None]) -> pd.Series:
    """Max over ``cols`` as float; a non-numeric value marks the row invalid."""
    if not cols:
        return pd.Series(np.nan, index=df.index, dtype="float64")
    values = []
    for c in cols:
        raw = df[c]
        num = pd.to_numeric(raw, errors="coerce")
        broken = raw.notna() & num.isna()
        for i in np.flatnonzero(broken.to_numpy()):
            if bad[i] is None:
                bad[i] = f"non-numeric {c} {_short(raw.iloc[i])}"
        values.append(num.astype("float64"))
    return pd.concat(values, axis=1).max(axis=1, skipna=True) if len(values) > 1 else values[0]


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _url_problem(url) -> str | None:
    if url is None or (isinstance(url, float) and np.isnan(url)):
        return "url is null"
    if not isinstance(url, str):
        return f"url is not text ({type(url).__name__})"
    u = url.strip()
    if not u:
        return "url is empty"
    try:
        parts = urlsplit(u)
    except ValueError as e:
        return f"url does not parse ({e})"
    if parts.scheme.lower() not in ("http", "https"):
        return f"url scheme {parts.scheme or '(none)'!r} is not http or https"
    if not parts.netloc:
        return "url has no host"
    return None


def prefilter_reasons(df: pd.DataFrame, pf) -> list[str]:
    """Every failed prefilter rule per row, '; '-joined ('' when it passes). The rules and
    their NULL policy (a missing value passes) are `curate.rules.PREFILTER`."""
    return failure_reasons(PREFILTER, pf, df)


def _texts(table: pa.Table, name: str, what: str, bad: list[str | None]) -> list:
    """One url/caption column as Python values: text stays text, binary is decoded as
    UTF-8 (undecodable bytes mark the row invalid, naming the column), other types pass
    through for the caller to refuse. Never the Python repr of a value."""
    col = table.column(table.column_names.index(name))
    typ = col.type
    if pa.types.is_dictionary(typ):
        col, typ = col.cast(typ.value_type), typ.value_type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        try:
            col.validate(full=True)  # checks the UTF-8
            return col.to_pylist()
        except pa.ArrowInvalid:  # text that is not UTF-8: decode value by value below
            col = col.cast(pa.binary() if pa.types.is_string(typ) else pa.large_binary())
    elif not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
        return col.to_pylist()
    out = []
    for i, v in enumerate(col.to_pylist()):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError as e:
            out.append(v)  # kept as bytes: not text, and still keys the row (_row_key)
            if bad[i] is None:
                bad[i] = f"{what} ({name}) is not UTF-8 text (byte {e.start}: {v[e.start:e.start + 4]!r})"
    return out


def _src_column(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A source column as kept: its own type, except text that is not valid UTF-8, which
    is kept as bytes (DuckDB refuses to read such text)."""
    typ = col.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        try:
            col.validate(full=True)
        except pa.ArrowInvalid:
            return col.cast(pa.binary() if pa.types.is_string(typ) else pa.large_binary())
    return col


# the staged parquet's candidate columns, typed even when every value is null
STAGED_SCHEMA = pa.schema([
    ("url", pa.string()), ("caption", pa.string()), ("width", pa.float64()), ("height", pa.float64()),
    ("clip_similarity", pa.float64()), ("nsfw_score", pa.float64()), ("watermark_score", pa.float64()),
    ("aesthetic_score", pa.float64()), ("sample_key", pa.string()), ("source_format", pa.string()),
    ("source_file", pa.string()), ("source_row", pa.int64()), ("file_idx", pa.int64()),
    ("status", pa.string()), ("reason", pa.string()),
])


def normalize_table(table: pa.Table, path: str, file_idx: int, cfg: IngestConfig) -> pa.Table:
    """One metadata table -> candidate rows (before dedup and sharding), with the source
    columns kept as ``src_...`` (sources.src_columns)."""
    drop = pandas_index_columns(table.schema)
    keep = [i for i, c in enumerate(table.column_names) if c not in drop]
    table = table.select(keep).replace_schema_metadata(None)  # pandas metadata never shapes the rows
    m = detect(table.column_names, cfg.format, cfg.url_col, cfg.caption_col, path)
    n = table.num_rows
    bad: list[str | None] = [None] * n
    out = pd.DataFrame(index=pd.RangeIndex(n))
    urls = _texts(table, m.url, "url", bad)
    for i, u in enumerate(urls):
        if bad[i] is None and (p := _url_problem(u)) is not None:
            bad[i] = p
    out["url"] = [u.strip() if isinstance(u, str) else None for u in urls]
    caps = _texts(table, m.caption, "caption", bad)
    for i, c in enumerate(caps):
        if bad[i] is None:
            if c is None or (isinstance(c, float) and np.isnan(c)):
                bad[i] = f"caption ({m.caption}) is null"
            elif not isinstance(c, str):
                bad[i] = f"caption ({m.caption}) is not text"
            elif not c.strip():
                bad[i] = f"caption ({m.caption}) is empty"
    out["caption"] = [c if isinstance(c, str) else None for c in caps]
    numeric = {c: table.column(table.column_names.index(c)).to_pandas() for cols in m.numeric_fields().values() for c in cols}
    for fld, cols in m.numeric_fields().items():
        out[fld] = _numeric(pd.DataFrame({c: numeric[c] for c in cols}), cols, fld, bad)
    for fld in ("width", "height"):
        nonpos = out[fld] <= 0
        for i in np.flatnonzero(nonpos.fillna(False).to_numpy()):
            if bad[i] is None:
                bad[i] = f"{fld} must be positive (got {out[fld].iat[i]})"
    out["sample_key"] = [_row_key(u, c) for u, c in zip(urls, caps)]
    out["source_format"] = m.format
    out["source_file"] = path
    out["source_row"] = np.arange(n, dtype="int64")
    out["file_idx"] = file_idx
    reasons = prefilter_reasons(out, cfg.prefilter)
    out["status"] = [S.INVALID if b else (S.PREFILTERED if r else S.CANDIDATE) for b, r in zip(bad, reasons)]
    out["reason"] = [b if b else r for b, r in zip(bad, reasons)]
    staged = pa.Table.from_pandas(out[STAGED_SCHEMA.names], schema=STAGED_SCHEMA, preserve_index=False)
    for i, name in enumerate(src_columns(table.column_names)):  # keep the source columns
        staged = staged.append_column(name, _src_column(table.column(i)))
    return staged


def _row_key(url, caption) -> str:
    """sample_key of one row; a url or caption that is not text (bytes that are not UTF-8,
    a number) is keyed on its raw value, so distinct values never collapse into duplicates."""
    if (url is None or isinstance(url, str)) and (caption is None or isinstance(caption, str)):
        return sample_key(url or "", caption or "")
    raw = [v if isinstance(v, bytes) else ("" if v is None else str(v)).encode("utf-8", "surrogatepass") for v in (url, caption)]
    return hashlib.blake2b(b"\x00raw\x1f" + raw[0] + b"\x1f" + raw[1], digest_size=16).hexdigest()


def normalize_file(file_idx: int, path: str, cfg: dict, staging: str) -> dict:
    """Ray task: one input file -> one staged parquet. Raises UserError on a bad file."""
    icfg = IngestConfig.model_validate(cfg)
    try:
        fs, local = fsspec.core.url_to_fs(path)
        table = pq.read_table(local, filesystem=fs)
    except Exception as e:
        raise UserError(f"cannot read {path} as parquet: {_one_line(e)}") from None
    staged = normalize_table(table, path, file_idx, icfg)
    fs, base = fsspec.core.url_to_fs(staging)  # shared by every node: the dataset's own filesystem
    fs.makedirs(base, exist_ok=True)
    out = f"{base}/{file_idx:06d}.parquet"
    with fs.open(out + ".tmp", "wb") as f:
        pq.write_table(staged, f)
    fs.mv(out + ".tmp", out)
    fmt = staged.column("source_format")[0].as_py() if staged.num_rows else None
    return {"rows": staged.num_rows, "format": fmt, "file": path, "staged": f"{staging}/{file_idx:06d}.parquet"}


def check_schemas(files: list[str], cfg: IngestConfig) -> None:
    """Read every file's footer: it must be parquet with the columns its format needs.
    A mistake is one line naming the file, before any Ray task or directory exists."""
    for path in files:
        try:
            fs, local = fsspec.core.url_to_fs(path)
            schema = pq.read_schema(local, filesystem=fs)
        except Exception as e:
            raise UserError(f"cannot read {path} as parquet: {_one_line(e)}") from None
        drop = pandas_index_columns(schema)
        detect([c for c in schema.names if c not in drop], cfg.format, cfg.url_col, cfg.caption_col, path)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:500]


def ingest(sources: list[str], out: str, config: PipelineConfig, ray_address: str | None = None, progress: bool = True) -> dict:
    """Run the ingest stage; returns its summary (also written to _commits/ingest.json)."""

    files = expand_sources(sources)
    cfg = config.ingest
    check_schemas(files, cfg)  # seconds, before Ray starts or anything is written
    store = ShardStore(out)
    out = store.root
    store.fs.makedirs(store.base, exist_ok=True)
    chash = config_hash({"cfg": cfg.model_dump(), "files": files})
    summary_path = store.path("_commits", "ingest.json")
    if store.fs.exists(summary_path):
        prev = json.load(store.fs.open(summary_path))
        if prev["config_hash"] == chash and all(store.is_committed(STAGE, s) for s in range(prev["shards"])):
            prev["skipped"] = True
            return prev
        if prev["config_hash"] != chash:
            raise UserError(
                f"{out} was already ingested from other inputs or settings; ingest into a new directory "
                f"(earlier inputs: {prev['files'][:3]}{' ...' if len(prev['files']) > 3 else ''})"
            )

    staging = store.url(OUT_DIR, "_tmp", "normalized")
    store.clean_staging([OUT_DIR])
    run = run_shards(
        "ingest: normalize",
        list(range(len(files))),
        _normalize_by_index,
        {"files": files, "cfg": cfg.model_dump(), "staging": staging},
        Resources(num_cpus=1),
        ray_address,
        progress,
    )
    if run.failures:
        store.clean_staging([OUT_DIR])
        msgs = "\n  ".join(f.get("error", "?").removeprefix("UserError: ") for f in run.failures)
        raise UserError(f"ingest stopped, nothing was written:\n  {msgs}")

    con = store.duckdb()
    con.execute("SET threads = ?", [max(1, os.cpu_count() or 1)])
    done = sorted(run.results, key=lambda r: r["staged"])  # file order
    raw, retyped = _union_staged(con, [r["staged"] for r in done], [r["file"] for r in done])
    raw.create("raw")
    input_rows = con.execute("SELECT count(*) FROM raw").fetchall()[0][0]
    con.execute(
        """
        CREATE TABLE dedup AS
        SELECT * FROM raw
        QUALIFY row_number() OVER (PARTITION BY sample_key ORDER BY file_idx, source_row) = 1
        """
    )
    kept = con.execute("SELECT count(*) FROM dedup").fetchall()[0][0]
    con.execute(
        """
        CREATE TABLE sharded AS
        SELECT *, CAST((row_number() OVER (
                   ORDER BY (status = $candidate) DESC, file_idx, source_row) - 1)
                   // $size AS INTEGER) AS shard
        FROM dedup
        """,
        {"candidate": S.CANDIDATE, "size": cfg.shard_size},
    )
    n_shards = con.execute("SELECT coalesce(max(shard) + 1, 0) FROM sharded").fetchall()[0][0]
    sharded = con.table("sharded")
    cols = [*S.CANDIDATE_COLUMNS, *[c for c in sharded.columns if c.startswith("src_")]]
    parts = os.path.join(store.staging_dir(OUT_DIR, 0), "parts")
    (sharded.order("shard, file_idx, source_row")
        .select(*[duckdb.ColumnExpression(c) for c in cols])
        .write_parquet(parts, partition_by=["shard"], write_partition_columns=True))
    counts = dict(con.execute("SELECT status, count(*) FROM dedup GROUP BY status ORDER BY status").fetchall())
    per_shard = {
        s: dict(zip(("rows", "candidates"), (r, c)))
        for s, r, c in con.execute(
            "SELECT shard, count(*), count(*) FILTER (status = ?) FROM sharded GROUP BY shard", [S.CANDIDATE]
        ).fetchall()
    }
    con.close()
    for s in range(n_shards):
        if store.is_committed(STAGE, s):
            continue
        shard_dir = os.path.join(parts, f"shard={s}")
        part_files = [os.path.join(shard_dir, f) for f in os.listdir(shard_dir) if f.endswith(".parquet")]
        assert len(part_files) == 1, part_files
        store.commit(STAGE, s, {f"{OUT_DIR}/{shard_name(s)}.parquet": part_files[0]}, per_shard[s], chash)
    store.discard(os.path.dirname(parts))
    store.clean_staging([OUT_DIR])
    summary = {
        "files": files,
        "formats": sorted({r["format"] for r in run.results if r.get("format")}),
        "input_rows": input_rows,
        "duplicates": input_rows - kept,
        "rows": kept,
        "status_counts": counts,
        "shards": n_shards,
        "shard_size": cfg.shard_size,
        "config_hash": chash,
        "retyped_columns": retyped,
    }
    store.write_json_atomic(summary_path, summary)
    return summary


NUMBER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE"}


def _is_number(t: str) -> bool:
    return t in NUMBER_TYPES or t.startswith("DECIMAL")


def _union_staged(con, staged: list[str], files: list[str]):
    """All staged files as one relation (by column name), and the source columns whose
    type differs between files, retyped: numbers of different widths become DuckDB's
    common number type, anything else text (VARCHAR), or bytes (BLOB, text as UTF-8)
    when one file holds bytes. Returns (relation, {column: "TYPE (was T1 in FILE, ...)"})."""
    every = con.read_parquet(staged, union_by_name=True)
    target = {c: str(t) for c, t in zip(every.columns, every.types)}
    per_file = []
    for p in staged:
        r = con.read_parquet(p)
        per_file.append({c: str(t) for c, t in zip(r.columns, r.types)})
    retype: dict[str, str] = {}
    for c in target:
        kinds = {f[c] for f in per_file if c in f}
        if len(kinds) < 2:
            continue
        if all(_is_number(k) for k in kinds):
            retype[c] = target[c]
        else:
            retype[c] = "BLOB" if "BLOB" in kinds else "VARCHAR"
    if not retype:
        return every, {}
    notes = {}
    for c, t in retype.items():
        seen: dict[str, str] = {}
        for f, types in zip(files, per_file):
            if c in types:
                seen.setdefault(types[c], f)
        notes[c] = f"{t} (" + ", ".join(f"{k} in {f}" for k, f in seen.items()) + ")"

    def expr(c: str, types: dict[str, str]):
        want = retype.get(c, target[c])
        if c not in types:  # the union takes the type of the files that have it
            null = duckdb.ConstantExpression(None)
            return (null.cast(duckdb.sqltype(want)) if c in retype else null).alias(c)
        col = duckdb.ColumnExpression(c)
        have = types[c]
        if have == want:
            return col.alias(c)
        if want == "BLOB":  # text as its UTF-8 bytes (a cast would read backslash escapes)
            text = col if have == "VARCHAR" else col.cast(duckdb.sqltype("VARCHAR"))
            return duckdb.FunctionExpression("encode", text).alias(c)
        return col.cast(duckdb.sqltype(want)).alias(c)

    groups: dict[tuple, list[str]] = {}  # files with one schema are read together
    for p, types in zip(staged, per_file):
        groups.setdefault(tuple(types.items()), []).append(p)
    rel = None
    for key, paths in groups.items():
        types = dict(key)
        part = con.read_parquet(paths).select(*[expr(c, types) for c in target])
        rel = part if rel is None else rel.union(part)
    return rel, notes


def _normalize_by_index(idx: int, files: list[str], cfg: dict, staging: str) -> dict:
    return normalize_file(idx, files[idx], cfg, staging)
