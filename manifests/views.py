"""DuckDB views over a dataset directory (DESIGN principle 3).

Each view reads the parquet files named by its stage's completion records, so a
half-written shard can never show up in a query. Views appear as stages complete.
"""

from __future__ import annotations

from mmloom.manifests.store import ShardStore

# view name -> (stage whose records list the files, folder, file-name suffix); a suffix
# starting with "." matches plain shard files only (00000.parquet, not 00000_crops.parquet)
VIEWS: dict[str, tuple[str, str, str]] = {
    "candidates": ("ingest", "candidates", ".parquet"),
    "downloads": ("download", "images", ".parquet"),
    "scores": ("score", "scores", ".parquet"),
    "selected": ("select", "selection", "selected.parquet"),
    "rejects": ("select", "selection", "rejects.parquet"),
    "detections": ("ground", "detections", ".parquet"),
    "final": ("build", "final", ".parquet"),
    "crops": ("build", "final", "_crops.parquet"),
}

# every column of a sample, joined on its key (ingest, download, score)
SAMPLES_SQL = """
SELECT c.* EXCLUDE (width, height, status, reason),
       c.width AS meta_width, c.height AS meta_height, c.status AS ingest_status, c.reason AS ingest_reason,
       d.key, d.status AS download_status, d.error_message AS download_error, d.sha256,
       d.original_width, d.original_height{score_cols}
FROM candidates c
LEFT JOIN downloads d USING (sample_key){score_join}
"""


def committed_files(store: ShardStore, stage: str, folder: str, suffix: str) -> list[str]:
    files = []
    for rec in store.records(stage):
        for rel in rec["files"]:
            name = rel.rsplit("/", 1)[-1]
            plain = suffix.startswith(".") and name[: -len(suffix)].isdigit()
            if rel.startswith(folder + "/") and name.endswith(suffix) and (plain or not suffix.startswith(".")):
                files.append(store.url(rel))
    return sorted(files)


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def open_dataset(root: str, extra_views: dict[str, str] | None = None):
    """A DuckDB connection with one view per available stage (plus ``extra_views`` SQL)."""

    store = ShardStore(root)
    con = store.duckdb()
    for name, (stage, folder, suffix) in VIEWS.items():
        files = committed_files(store, stage, folder, suffix)
        if files:
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_sql_list(files)}, union_by_name=true)")
    names = set(view_names(con))
    if {"candidates", "downloads"} <= names:
        has_scores = "scores" in names
        con.execute("CREATE VIEW samples AS " + SAMPLES_SQL.format(
            score_cols=",\n       s.* EXCLUDE (sample_key, key, original_width, original_height)" if has_scores else "",
            score_join="\nLEFT JOIN scores s USING (sample_key)" if has_scores else "",
        ))
    for name, sql in (extra_views or {}).items():
        con.execute(f"CREATE VIEW {name} AS {sql}")
    return con


def view_names(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name").fetchall()]
