"""DuckDB views over a dataset directory (DESIGN principle 3).

Each view reads the parquet files named by its stage's completion records, so a
half-written shard can never show up in a query. Views appear as stages complete.
"""

from __future__ import annotations

from mmloom.manifests.store import ShardStore

# view name -> (stage whose records list the files, folder, suffix of the files)
VIEWS: dict[str, tuple[str, str, str]] = {
    "candidates": ("ingest", "candidates", ".parquet"),
    "downloads": ("download", "images", ".parquet"),
}


def committed_files(store: ShardStore, stage: str, folder: str, suffix: str) -> list[str]:
    files = []
    for rec in store.records(stage):
        files += [store.url(rel) for rel in rec["files"] if rel.startswith(folder + "/") and rel.endswith(suffix) and "_stats" not in rel]
    return sorted(files)


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def open_dataset(root: str, extra_views: dict[str, str] | None = None):
    """A DuckDB connection with one view per available stage (plus ``extra_views`` SQL)."""
    import duckdb

    store = ShardStore(root)
    con = duckdb.connect()
    for name, (stage, folder, suffix) in VIEWS.items():
        files = committed_files(store, stage, folder, suffix)
        if files:
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_sql_list(files)}, union_by_name=true)")
    for name, sql in (extra_views or {}).items():
        con.execute(f"CREATE VIEW {name} AS {sql}")
        available.append(name)
    return con


def view_names(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name").fetchall()]
