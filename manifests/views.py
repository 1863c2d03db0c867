"""DuckDB views over a dataset directory (ARCHITECTURE.md, principle 3).

Each view reads the parquet files named by its stage's completion records, so a
half-written shard can never show up in a query. Views appear as stages complete.
"""

from __future__ import annotations

from contextlib import contextmanager

import duckdb

from mmloom.errors import UserError
from .sql import ident
from .schemas import TABLE_DIRS
from .store import ShardStore

# view name -> (stage whose records list the files, folder): one table per folder
VIEWS: dict[str, tuple[str, str]] = dict(TABLE_DIRS)

# every column of a sample, joined on its key (ingest, download, score)
SAMPLES_SQL = """
SELECT c.* EXCLUDE (width, height, status, reason),
       c.width AS meta_width, c.height AS meta_height, c.status AS ingest_status, c.reason AS ingest_reason,
       d.key, d.status AS download_status, d.error_message AS download_error, d.sha256,
       d.original_width, d.original_height{score_cols}
FROM candidates c
LEFT JOIN downloads d USING (sample_key){score_join}
"""


def committed_files(store: ShardStore, stage: str, folder: str) -> list[str]:
    """The parquet files of ``folder`` that ``stage``'s completion records list."""
    files = []
    for rec in store.records(stage):
        for rel in rec["files"]:
            if rel.startswith(folder + "/") and rel.endswith(".parquet") and "/" not in rel[len(folder) + 1:]:
                files.append(store.url(rel))
    return sorted(files)


def dataset_files(store: ShardStore) -> dict[str, str]:
    """Every committed parquet file a view reads -> the stage that wrote it."""
    out: dict[str, str] = {}
    for stage, folder in VIEWS.values():
        for f in committed_files(store, stage, folder):
            out.setdefault(f, stage)
    return out


def _fs_path(store: ShardStore, url: str) -> str:
    """``store.url(rel)`` -> ``store.path(rel)`` (the form the filesystem takes)."""
    return store.path(url[len(store.root) + 1:])


def _first_line(e: BaseException) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in str(e))
    return " ".join(text.split())[:300]


def _damaged(f: str, stage: str, why: str) -> UserError:
    return UserError(f"cannot read {f} ({why}); it was written by the {stage} stage: delete it, then rerun that stage")


def _unreadable(store: ShardStore, files: dict[str, str], err: BaseException) -> UserError | None:
    """The committed file behind a DuckDB read error, as a one-line UserError naming it:
    the file the message names, else the first one pyarrow cannot read through (footer,
    then every page). None when every file reads (the error is something else)."""
    import pyarrow.parquet as pq

    text = str(err)
    named = [f for f in files if f in text or _fs_path(store, f) in text]
    if named:
        f = max(named, key=len)
        return _damaged(f, files[f], _first_line(err))
    for f, stage in files.items():
        try:
            with store.fs.open(_fs_path(store, f), "rb") as fh:
                for _ in pq.ParquetFile(fh).iter_batches(batch_size=65536):
                    pass
        except Exception as e:  # any failure to parse is the file's, named here
            return _damaged(f, stage, _first_line(e))
    return None


@contextmanager
def reading(root: str):
    """Run queries over the dataset's views: a DuckDB error caused by a damaged committed
    file becomes a one-line UserError naming that file; any other error is left as it is."""
    try:
        yield
    except duckdb.Error as e:
        if isinstance(e, (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException)):
            raise
        store = ShardStore(root)
        mapped = _unreadable(store, dataset_files(store), e)
        if mapped is None:
            raise
        raise mapped from None


def open_dataset(root: str, extra_views: dict[str, str] | None = None):
    """A DuckDB connection with one view per available stage (plus ``extra_views``:
    SQL written by mmloom, never from data). A committed file DuckDB cannot open is a
    one-line UserError naming it."""

    store = ShardStore(root)
    con = store.duckdb()
    for name, (stage, folder) in VIEWS.items():
        files = committed_files(store, stage, folder)
        if files:
            try:  # binding reads every file's footer (union_by_name)
                con.read_parquet(files, union_by_name=True).create_view(name)
            except duckdb.Error as e:
                mapped = _unreadable(store, {f: stage for f in files}, e)
                con.close()
                if mapped is None:
                    raise
                raise mapped from None
    names = set(view_names(con))
    if {"candidates", "downloads"} <= names:
        has_scores = "scores" in names
        con.execute("CREATE VIEW samples AS " + SAMPLES_SQL.format(
            score_cols=",\n       s.* EXCLUDE (sample_key, key, original_width, original_height)" if has_scores else "",
            score_join="\nLEFT JOIN scores s USING (sample_key)" if has_scores else "",
        ))
    for name, sql in (extra_views or {}).items():
        con.execute(f"CREATE VIEW {ident(name)} AS {sql}")
    return con


def view_names(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name").fetchall()]
