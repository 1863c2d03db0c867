"""`mmloom ingest`: metadata parquet -> candidates/ shards.

Per input file (a Ray task): detect the schema, normalize to the candidates schema,
give each row its stable sample key, validate rows and apply the metadata prefilters.
Then, globally, DuckDB drops exact url+caption duplicates and assigns rows to shards of
``shard_size`` deterministically (eligible rows first, in file and row order), and each
shard is committed atomically. Rows never disappear silently: invalid and prefiltered
rows stay with a status and reason; duplicates are counted in the summary.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import fsspec
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmloom.curate.config import IngestConfig, PipelineConfig
from mmloom.curate.runner import Resources, run_shards
from mmloom.curate.sources import detect
from mmloom.errors import UserError
from mmloom.manifests import schemas as S
from mmloom.manifests.store import ShardStore, config_hash, shard_name

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
        if any(ch in s for ch in "*?["):
            hits = sorted(fs.glob(path))
            if not hits:
                raise UserError(f"no file matches {s!r}")
        elif fs.isdir(path):
            hits = sorted(fs.glob(path.rstrip("/") + "/**/*.parquet"))
            if not hits:
                raise UserError(f"directory {s} holds no .parquet file")
        elif not fs.exists(path):
            raise UserError(f"input file not found: {s}")
        else:
            hits = [path]
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
                bad[i] = f"non-numeric {c} {raw.iloc[i]!r}"
        values.append(num.astype("float64"))
    return pd.concat(values, axis=1).max(axis=1, skipna=True) if len(values) > 1 else values[0]


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
    """Every failed prefilter rule per row, '; '-joined ('' when it passes)."""
    w, h = df["width"], df["height"]
    aspect = w / h
    area = w * h
    # (failing mask, values, message template); a NaN value compares False and passes
    checks = [
        (pf.min_aspect, aspect, lambda v, t: v < t, "aspect {v:.3f} < {t}"),
        (pf.max_aspect, aspect, lambda v, t: v > t, "aspect {v:.3f} > {t}"),
        (pf.min_area, area, lambda v, t: v < t, "area {v:.0f} < {t:.0f}"),
        (pf.min_clip_similarity, df["clip_similarity"], lambda v, t: v < t, "clip_similarity {v:.3f} < {t}"),
        (pf.max_nsfw, df["nsfw_score"], lambda v, t: v >= t, "nsfw {v:.3f} >= {t}"),
        (pf.max_watermark, df["watermark_score"], lambda v, t: v >= t, "watermark {v:.3f} >= {t}"),
        (pf.min_aesthetic, df["aesthetic_score"], lambda v, t: v < t, "aesthetic {v:.2f} < {t}"),
    ]
    rules = [(fails(values, t).fillna(False), values, t, text) for t, values, fails, text in checks if t is not None]
    reasons: list[list[str]] = [[] for _ in range(len(df))]
    for mask, values, t, text in rules:
        for i in np.flatnonzero(mask.to_numpy()):
            reasons[i].append(text.format(v=values.iat[i], t=t))
    return ["; ".join(r) for r in reasons]


def normalize_table(table: pa.Table, path: str, file_idx: int, cfg: IngestConfig) -> pd.DataFrame:
    """One metadata table -> candidate rows (before dedup and sharding)."""
    m = detect(table.column_names, cfg.format, cfg.url_col, cfg.caption_col, path)
    df = table.to_pandas(types_mapper=None)
    n = len(df)
    bad: list[str | None] = [None] * n
    out = pd.DataFrame(index=df.index)
    urls = df[m.url]
    for i, u in enumerate(urls.tolist()):
        if (p := _url_problem(u)) is not None:
            bad[i] = p
    out["url"] = [u.strip() if isinstance(u, str) else None for u in urls.tolist()]
    caps = df[m.caption].tolist()
    for i, c in enumerate(caps):
        if bad[i] is None:
            if c is None or (isinstance(c, float) and np.isnan(c)):
                bad[i] = f"caption ({m.caption}) is null"
            elif not isinstance(c, str):
                bad[i] = f"caption ({m.caption}) is not text"
            elif not c.strip():
                bad[i] = f"caption ({m.caption}) is empty"
    out["caption"] = [c if isinstance(c, str) else None for c in caps]
    for fld, cols in m.numeric_fields().items():
        out[fld] = _numeric(df, cols, fld, bad)
    for fld in ("width", "height"):
        nonpos = out[fld] <= 0
        for i in np.flatnonzero(nonpos.fillna(False).to_numpy()):
            if bad[i] is None:
                bad[i] = f"{fld} must be positive (got {out[fld].iat[i]})"
    out["sample_key"] = [sample_key(u or "", c if isinstance(c, str) else "") for u, c in zip(out["url"], caps)]
    out["source_format"] = m.format
    out["source_file"] = path
    out["source_row"] = np.arange(n, dtype="int64")
    out["file_idx"] = file_idx
    reasons = prefilter_reasons(out, cfg.prefilter)
    out["status"] = [S.INVALID if b else (S.PREFILTERED if r else S.CANDIDATE) for b, r in zip(bad, reasons)]
    out["reason"] = [b if b else r for b, r in zip(bad, reasons)]
    for c in table.column_names:  # keep the source columns, prefixed
        out["src_" + c.lower()] = df[c]
    return out


def normalize_file(file_idx: int, path: str, cfg: dict, staging: str) -> dict:
    """Ray task: one input file -> one staged parquet. Raises UserError on a bad file."""
    icfg = IngestConfig.model_validate(cfg)
    try:
        fs, local = fsspec.core.url_to_fs(path)
        table = pq.read_table(local, filesystem=fs)
    except Exception as e:
        raise UserError(f"cannot read {path} as parquet: {e}") from None
    df = normalize_table(table, path, file_idx, icfg)
    fs, base = fsspec.core.url_to_fs(staging)  # shared by every node: the dataset's own filesystem
    fs.makedirs(base, exist_ok=True)
    out = f"{base}/{file_idx:06d}.parquet"
    with fs.open(out + ".tmp", "wb") as f:
        df.to_parquet(f, index=False)
    fs.mv(out + ".tmp", out)
    return {"rows": len(df), "format": df["source_format"].iat[0] if len(df) else None, "file": path}


def ingest(sources: list[str], out: str, config: PipelineConfig, ray_address: str | None = None, progress: bool = True) -> dict:
    """Run the ingest stage; returns its summary (also written to _commits/ingest.json)."""

    files = expand_sources(sources)
    cfg = config.ingest
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
    con.execute(f"SET threads TO {max(1, os.cpu_count() or 1)}")
    con.execute(
        f"CREATE TABLE raw AS SELECT * FROM read_parquet('{staging}/*.parquet', union_by_name=true)"
    )
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
        f"""
        CREATE TABLE sharded AS
        SELECT *, CAST((row_number() OVER (
                   ORDER BY (status = '{S.CANDIDATE}') DESC, file_idx, source_row) - 1)
                   // {cfg.shard_size} AS INTEGER) AS shard
        FROM dedup
        """
    )
    n_shards = con.execute("SELECT coalesce(max(shard) + 1, 0) FROM sharded").fetchall()[0][0]
    src_cols = [r[0] for r in con.execute("DESCRIBE sharded").fetchall() if r[0].startswith("src_")]
    cols = ", ".join([*S.CANDIDATE_COLUMNS, *[f'"{c}"' for c in src_cols]])
    parts = os.path.join(store.staging_dir(OUT_DIR, 0), "parts")
    con.execute(
        f"COPY (SELECT {cols} FROM sharded ORDER BY shard, file_idx, source_row) "
        f"TO '{parts}' (FORMAT parquet, PARTITION_BY (shard), WRITE_PARTITION_COLUMNS true)"
    )
    counts = dict(con.execute("SELECT status, count(*) FROM dedup GROUP BY status ORDER BY status").fetchall())
    per_shard = {
        s: dict(zip(("rows", "candidates"), (r, c)))
        for s, r, c in con.execute(
            f"SELECT shard, count(*), count(*) FILTER (status = '{S.CANDIDATE}') FROM sharded GROUP BY shard"
        ).fetchall()
    }
    con.close()
    for s in range(n_shards):
        if store.is_committed(STAGE, s):
            continue
        part_files = glob.glob(os.path.join(parts, f"shard={s}", "*.parquet"))
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
    }
    store.write_json_atomic(summary_path, summary)
    return summary


def _normalize_by_index(idx: int, files: list[str], cfg: dict, staging: str) -> dict:
    return normalize_file(idx, files[idx], cfg, staging)
