"""`mmloom select`: thresholds -> one DuckDB query over the manifests, plus near-duplicates.

Scoring never deletes; selection is SQL. Each rule is a predicate that must be TRUE to
pass; the threshold rules are defined once in `curate.rules` (shared with ingest's
prefilters) and compiled here with select's NULL policy: a NULL (a missing score) fails
the rule with the value ``NULL``, so a sample with a missing score is never selected
silently. The reject ledger keeps, for every rejected sample, every rule it failed with
the value and the threshold. Changing a threshold re-runs this query, not the models.
"""

from __future__ import annotations

import os

from .config import PipelineConfig, SelectConfig
from .rules import GROUP_RULES, SELECT, SqlRule, sql_rules
from mmloom.errors import UserError
from ..manifests import schemas as S
from ..manifests.store import ShardStore, config_hash
from ..manifests.sql import ident, ident_list
from ..manifests.views import open_dataset, reading, view_names

STAGE = "select"
OUT_DIR = S.STAGE_DIRS[STAGE]


def rules(cfg: SelectConfig) -> list[SqlRule]:
    """The enabled rules, in funnel order: the sample was scored, the threshold rules of
    `curate.rules.SELECT` (a missing value fails), the caption survived cleaning."""
    out = [SqlRule("scorable", f"{ident('score_error')} IS NULL AND {ident('clip_score')} IS NOT NULL",
                   f"coalesce({ident('score_error')}, 'not scored')", "image scored", ("score_error",))]
    out += sql_rules(SELECT, cfg)
    if cfg.require_clean_caption:
        out.append(SqlRule("require_clean_caption", f"{ident('caption_reason')} IS NULL AND {ident('clean_caption')} IS NOT NULL",
                           ident("caption_reason"), "non-empty clean caption", ("caption_reason",)))
    return out


def _text(s: str) -> str:
    """A rule name or threshold label made here, as an SQL string literal."""
    return "'" + s.replace("'", "''") + "'"


def failed_expr(rs: list[SqlRule]) -> str:
    items = ",\n    ".join(
        f"CASE WHEN ({r.passes}) THEN NULL ELSE "
        f"{{'rule': {_text(r.name)}, 'value': coalesce(CAST(({r.value}) AS VARCHAR), 'NULL'), 'threshold': {_text(r.threshold)}}} END"
        for r in rs
    )
    return f"list_filter([\n    {items}\n  ], lambda x: x IS NOT NULL)"


def build_query(cfg: SelectConfig, columns: set[str]) -> str:
    """The one query: every downloaded sample with the list of rules it fails."""
    rs = rules(cfg)
    for r in rs:
        lacking = [c for c in r.needs if c not in columns]
        if lacking:
            raise UserError(
                f"select.{r.name} needs the score column(s) {lacking}, which the score stage did not compute; "
                f"enable that scorer or set select.{r.name}: null"
            )
    return f"""
SELECT sample_key, failed, len(failed) = 0 AS passes
FROM (
  SELECT sample_key,
  {failed_expr(rs)} AS failed
  FROM samples
  WHERE download_status = 'success'
)"""


def _members(con, where: str = "") -> tuple[list, list]:
    from .dedup import Member

    rows = con.execute(f"""SELECT sample_key, clip_score, original_width::DOUBLE * original_height, phash_int
                          FROM passing WHERE phash IS NOT NULL {where} ORDER BY sample_key""").fetchall()
    return [Member(k, c, a) for k, c, a, _h in rows], [h for *_r, h in rows]


def near_duplicates(con, max_distance: int) -> dict[str, tuple[str, int]]:
    """Among passing samples: dropped sample_key -> (kept sample_key, bit distance), found
    with faiss's multi-hash index over the perceptual hashes (``curate.dedup``)."""
    from .dedup import near_duplicate_hashes

    members, hashes = _members(con)
    return near_duplicate_hashes(members, hashes, max_distance) if members else {}


def semantic_duplicates(con, threshold: float, k: int) -> dict[str, tuple[str, float]]:
    """Among passing samples not already dropped as hash duplicates: dropped sample_key ->
    (kept sample_key, cosine), from a k-NN index over the stored CLIP image embeddings."""
    import numpy as np

    from .dedup import Member, semantic_duplicates as groups

    t = con.sql("""SELECT sample_key, clip_score, original_width::DOUBLE * original_height AS area, clip_image_embedding
                       FROM passing WHERE clip_image_embedding IS NOT NULL
                         AND sample_key NOT IN (SELECT sample_key FROM dup) ORDER BY sample_key""").to_arrow_table()
    if not hasattr(t, "num_rows"):  # a RecordBatchReader
        t = t.read_all()
    if t.num_rows < 2:
        return {}
    members = [Member(k, c, a) for k, c, a in zip(*(t.column(n).to_pylist() for n in ("sample_key", "clip_score", "area")))]
    emb = np.asarray(t.column("clip_image_embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                     dtype=np.float32).reshape(t.num_rows, -1)
    return groups(members, emb, threshold, k)


def select(root: str, config: PipelineConfig, dry_run: bool = False) -> dict:
    """Run the selection query; write selected/ and rejects/ unless ``dry_run``. Returns the funnel."""
    cfg = config.select
    con = open_dataset(root)
    if "scores" not in view_names(con):
        raise UserError(f"{root} has no scores yet; run `mmloom score {root}` first")
    with reading(root):  # a damaged committed file: one line naming it
        return _select(con, root, cfg, dry_run)


def _select(con, root: str, cfg: SelectConfig, dry_run: bool) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    sql = build_query(cfg, columns)
    con.execute(f"CREATE TEMP TABLE judged AS {sql}")
    con.execute("CREATE TEMP VIEW passing AS SELECT s.* FROM samples s JOIN judged j USING (sample_key) WHERE j.passes")
    for name in GROUP_RULES:
        lacking = [c for c in GROUP_RULES[name].needs if c not in columns]
        if getattr(cfg, name) is not None and lacking:
            raise UserError(f"select.{name} needs the score column(s) {lacking}, which the score stage did not store; "
                            f"enable them (score.phash, score.clip.store_embeddings) or set select.{name}: null")
    dups = near_duplicates(con, cfg.dedup_max_distance) if cfg.dedup_max_distance is not None else {}
    con.execute("CREATE TEMP TABLE dup (sample_key VARCHAR, rule VARCHAR, value VARCHAR, threshold VARCHAR)")
    if dups:
        con.executemany("INSERT INTO dup VALUES (?, 'dedup_max_distance', ?, ?)",
                        [(k, f"{d} bits from {kept}", str(cfg.dedup_max_distance)) for k, (kept, d) in dups.items()])
    if cfg.semantic_dedup_threshold is not None:
        sem = semantic_duplicates(con, cfg.semantic_dedup_threshold, cfg.semantic_dedup_neighbors)
        if sem:
            con.executemany("INSERT INTO dup VALUES (?, 'semantic_dedup_threshold', ?, ?)",
                            [(k, f"cosine {c:.4f} to {kept}", str(cfg.semantic_dedup_threshold)) for k, (kept, c) in sem.items()])
    con.execute("""
        CREATE TEMP TABLE final AS
        SELECT j.sample_key,
               CASE WHEN dup.sample_key IS NULL THEN j.failed
                    ELSE list_append(j.failed, {'rule': dup.rule, 'value': dup.value, 'threshold': dup.threshold}) END AS failed
        FROM judged j LEFT JOIN dup USING (sample_key)
    """)
    rule_names = [r.name for r in rules(cfg)] + [n for n in GROUP_RULES if getattr(cfg, n) is not None]
    per_rule = dict(con.execute("""
        SELECT f.rule, count(*) FROM (SELECT unnest(failed) AS f FROM final) GROUP BY 1
    """).fetchall())
    first_rule = dict(con.execute("SELECT failed[1].rule, count(*) FROM final WHERE len(failed) > 0 GROUP BY 1").fetchall())
    total = con.execute("SELECT count(*) FROM final").fetchall()[0][0]
    n_sel = con.execute("SELECT count(*) FROM final WHERE len(failed) = 0").fetchall()[0][0]
    funnel = {"scored_samples": total, "selected": n_sel, "rejected": total - n_sel,
              "rules": [{"rule": r, "fails": per_rule.get(r, 0), "first_failure": first_rule.get(r, 0)} for r in rule_names],
              "sql": sql}
    if dry_run:
        con.close()
        return funnel

    store = ShardStore(root)
    emb = [c for c in columns if c.endswith("_embedding")]
    exclude = f" EXCLUDE ({ident_list(emb)})" if emb else ""
    selected = con.sql(f"""
        SELECT s.*{exclude} FROM samples s JOIN final f USING (sample_key)
        WHERE len(f.failed) = 0 ORDER BY s.shard, s.source_row, s.sample_key
    """).to_arrow_table()
    rejects = con.sql("""
        SELECT f.sample_key, s.shard, s.key, s.url, s.caption, f.failed, f.failed[1].rule AS first_rule
        FROM final f JOIN samples s USING (sample_key)
        WHERE len(f.failed) > 0 ORDER BY s.shard, s.source_row, f.sample_key
    """).to_arrow_table()
    con.close()
    staging = store.staging_dir(OUT_DIR, 0)
    paths = {}
    for rel, table in ((S.SELECTED_FILE, selected), (S.REJECTS_FILE, rejects)):  # one table per folder
        p = os.path.join(staging, rel.replace("/", "_"))
        if isinstance(table, pa.RecordBatchReader):
            table = table.read_all()
        pq.write_table(table, p)
        paths[rel] = p
    store.uncommit(STAGE, 0)
    store.commit(STAGE, 0, paths, {"selected": n_sel, "rejected": total - n_sel},
                 config_hash(cfg.model_dump()), {"rules": funnel["rules"]})
    store.discard(staging)
    for old in ("selected.parquet", "rejects.parquet"):  # where both tables were before they had their own folders
        if store.exists("selection", old):
            store.fs.rm_file(store.path("selection", old))
    return funnel


def render_funnel(f: dict) -> str:
    lines = [f"{f['scored_samples']} downloaded samples judged: {f['selected']} selected, {f['rejected']} rejected",
             f"  {'rule':<24} {'fails':>7} {'first failure':>14}"]
    for r in f["rules"]:
        lines.append(f"  {r['rule']:<24} {r['fails']:>7} {r['first_failure']:>14}")
    return "\n".join(lines)
