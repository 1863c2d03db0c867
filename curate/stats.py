"""`mmloom stats`: the funnel, counts per stage and per status or reason.

Principle 4: every input row ends in one status, so each stage's counts add up to the
rows that reached it. The same numbers feed the dataset card.
"""

from __future__ import annotations

import json

from ..manifests.store import ShardStore
from ..manifests.views import open_dataset, reading, view_names


def funnel(root: str, top: int = 5) -> dict:
    con = open_dataset(root)
    try:
        with reading(root):
            return _funnel(con, root, top)
    finally:
        con.close()


def _funnel(con, root: str, top: int) -> dict:
    views = set(view_names(con))
    store = ShardStore(root)
    out: dict = {"dataset": store.root}
    if store.exists("_commits", "ingest.json"):
        s = json.load(store.open("_commits", "ingest.json"))
        out["metadata_rows"] = s["input_rows"]
        out["duplicates_dropped"] = s["duplicates"]
        out["ingest_shards"] = s["shards"]
    if "candidates" in views:
        out["candidates"] = dict(con.execute("SELECT status, count(*) FROM candidates GROUP BY 1 ORDER BY 2 DESC").fetchall())
        out["candidate_reasons"] = {
            status: con.execute(
                """SELECT rule, count(*) FROM (
                      SELECT regexp_extract(unnest(string_split(reason, '; ')), '^[^0-9(]*[^ 0-9(]') AS rule
                      FROM candidates WHERE status = $status)
                    GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $top""",
                {"status": status, "top": top},
            ).fetchall()
            for status in ("invalid", "prefiltered")
        }
    if "downloads" in views:
        out["downloads"] = dict(con.execute("SELECT status, count(*) FROM downloads GROUP BY 1 ORDER BY 2 DESC").fetchall())
        out["download_errors"] = con.execute(
            """SELECT status, error_message, count(*) FROM downloads
                WHERE status NOT IN ('success', 'skipped') GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT ?""",
            [top],
        ).fetchall()
    if "scores" in views:
        out["scored"] = con.execute("SELECT count(*), count(score_error) FROM scores").fetchall()[0]
    if "selected" in views:
        out["selected"] = con.execute("SELECT count(*) FROM selected").fetchall()[0][0]
        out["rejected_by_first_rule"] = con.execute(
            "SELECT first_rule, count(*) FROM rejects GROUP BY 1 ORDER BY 2 DESC, 1").fetchall() if "rejects" in views else []
    if "detections" in views:
        out["grounded"] = con.execute("SELECT count(DISTINCT sample_key), count(*) FROM detections").fetchall()[0]
    if "final" in views:
        out["built"] = dict(con.execute("SELECT status, count(*) FROM final GROUP BY 1 ORDER BY 1").fetchall())
        out["crops"] = con.execute("SELECT coalesce(sum(n_crops), 0), count(*) FILTER (has_person) FROM final WHERE status = 'built'").fetchall()[0]
    return out


def _statuses(lines: list[str], title: str, counts: dict, reasons: dict) -> None:
    """A total, then one line per status, each followed by its commonest reasons."""
    lines.append(f"  {title:<22} {sum(counts.values()):>9}")
    for status, n in counts.items():
        lines.append(f"    {status:<20} {n:>9}")
        for rule, m in reasons.get(status, []):
            lines.append(f"        {rule:<28} {m:>6}")


def render(f: dict) -> str:
    lines = [f"dataset {f['dataset']}"]
    if "metadata_rows" in f:
        lines.append(f"  metadata rows          {f['metadata_rows']:>9}")
        lines.append(f"  - duplicates dropped   {f['duplicates_dropped']:>9}")
    if "candidates" in f:
        _statuses(lines, "ingested rows", f["candidates"], f["candidate_reasons"])
    if "downloads" in f:
        _statuses(lines, "download statuses", f["downloads"], {})
        if f["download_errors"]:
            lines.append("  most common download failures:")
            for status, msg, n in f["download_errors"]:
                lines.append(f"    {n:>5}  {status}: {(msg or '')[:90]}")
    if "scored" in f:
        lines.append(f"  scored images          {f['scored'][0]:>9}   ({f['scored'][1]} could not be decoded)")
    if "selected" in f:
        rejected = sum(n for _r, n in f["rejected_by_first_rule"])
        lines.append(f"  rejected at select     {rejected:>9}")
        for rule, n in f["rejected_by_first_rule"]:
            lines.append(f"    {rule:<25}{n:>5}")
        lines.append(f"  SELECTED               {f['selected']:>9}")
    if "grounded" in f:
        lines.append(f"  grounded (with boxes)  {f['grounded'][0]:>9}   ({f['grounded'][1]} boxes)")
    if "built" in f:
        for status, n in f["built"].items():
            if status != "built":
                lines.append(f"  - {status:<20} {n:>9}")
        lines.append(f"  FINAL (built)          {f['built'].get('built', 0):>9}   ({f['crops'][0]} crops, {f['crops'][1]} samples with a person)")
    return "\n".join(lines)
