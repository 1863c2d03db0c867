"""The Python API: the same stages as the `mmloom` commands, as functions with keyword
arguments, for notebooks and scripts.

Each stage function takes the dataset directory and, as keyword arguments, keys of its
own config section (``select(root, min_clip_score=0.28, max_people=1)``; a nested key as
a dict: ``score(root, clip={"model": "ViT-B-32/openai"})``; ``None`` switches a rule
off), plus ``config=`` (a pipeline YAML; default DIR/mmloom.yaml as the commands do),
``ray_address=`` and ``progress=``. It runs the stage under the dataset's writer lock,
saves the settings to DIR/mmloom.yaml like the command does, and returns the summary
dict the command prints from. A misspelt key is a ``UserError`` naming it.

    import mmloom.api as mm
    mm.ingest(["laion-part-00000.parquet"], out="ds", shard_size=10_000)
    mm.download("ds"); mm.score("ds"); mm.select("ds", min_clip_score=0.28)
    mm.ground("ds"); mm.build("ds")
    mm.stats("ds")["selected"]; mm.query("ds", "SELECT first_rule, count(*) FROM rejects GROUP BY 1")
"""

from __future__ import annotations

from typing import Any

from mmloom.errors import UserError

__all__ = ["ingest", "download", "score", "select", "ground", "build", "run", "browse", "stats", "query", "config"]


def config(root: str, config: str | None = None, section: str | None = None, **settings: Any):
    """The dataset's pipeline config (``config`` YAML, else DIR/mmloom.yaml, else
    defaults) with ``settings`` applied to ``section``: a validated ``PipelineConfig``."""
    from mmloom.configbase import _deep_merge, load_model
    from mmloom.curate.config import PipelineConfig
    from mmloom.curate.dataset import dataset_config

    cfg = dataset_config(root, config)
    if not settings:
        return cfg
    data = cfg.model_dump(mode="json")
    _deep_merge(data.setdefault(section, {}), settings)
    return load_model(PipelineConfig, None, None, data=data, source=f"keyword arguments of mmloom.api.{section}")


def _stage(name: str, root: str, run_keywords: dict, config_path: str | None, ray_address: str | None,
           progress: bool, settings: dict) -> dict:
    from mmloom.curate.dataset import save_dataset_config
    from mmloom.curate.stages import BY_NAME
    from mmloom.manifests.lock import writer_lock

    entry = BY_NAME[name]
    cfg = config(root, config_path, name, **settings)
    if run_keywords.get("dry_run"):
        return entry.run(root, cfg, None, progress, **run_keywords)
    with writer_lock(root, f"mmloom.api.{name}"):
        s = entry.run(root, cfg, ray_address, progress, **run_keywords)
        save_dataset_config(root, cfg)
    failed = s.get("failed") or []
    if failed:
        s["failed_shards"] = [f.get("shard") for f in failed]
    return s


def ingest(sources: list[str] | str, out: str, *, config: str | None = None, ray_address: str | None = None,
           progress: bool = False, **settings) -> dict:
    """Metadata parquet files, globs or folders -> ``out/candidates/`` (ingest.*: format,
    url_col, caption_col, shard_size, prefilter={...})."""
    from mmloom.curate.ingest import expand_sources

    srcs = expand_sources([sources] if isinstance(sources, str) else list(sources))
    return _stage("ingest", out, {"sources": srcs}, config, ray_address, progress, settings)


def download(root: str, *, retry_failed: bool = False, config: str | None = None, ray_address: str | None = None,
             progress: bool = False, **settings) -> dict:
    """img2dataset over every candidate shard -> ``root/images/`` (download.*)."""
    return _stage("download", root, {"retry_failed": retry_failed}, config, ray_address, progress, settings)


def score(root: str, *, config: str | None = None, ray_address: str | None = None, progress: bool = False, **settings) -> dict:
    """Every downloaded image scored -> ``root/scores/`` (score.*)."""
    return _stage("score", root, {}, config, ray_address, progress, settings)


def select(root: str, *, dry_run: bool = False, config: str | None = None, progress: bool = False, **settings) -> dict:
    """Thresholds and dedup as one query -> ``root/selected/`` and the ledger ``root/rejects/``
    (select.*); returns the funnel per rule. ``dry_run`` writes nothing."""
    return _stage("select", root, {"dry_run": dry_run}, config, None, progress, settings)


def ground(root: str, *, config: str | None = None, ray_address: str | None = None, progress: bool = False, **settings) -> dict:
    """Grounding DINO boxes for the phrases of each selected caption -> ``root/detections/`` (ground.*)."""
    return _stage("ground", root, {}, config, ray_address, progress, settings)


def build(root: str, *, config: str | None = None, ray_address: str | None = None, progress: bool = False, **settings) -> dict:
    """Crop rules, final shards and tables, the dataset card (build.*)."""
    return _stage("build", root, {}, config, ray_address, progress, settings)


def run(pipeline: str, out: str | None = None, *, ray_address: str | None = None, progress: bool = False) -> int:
    """Every stage of a pipeline YAML in order, resuming (``mmloom run``); 0 when all shards committed."""
    from mmloom.curate.run import run_pipeline

    return run_pipeline(pipeline, out, ray_address, progress)


def browse(root: str, *, progress: bool = False) -> dict:
    """Write the static browser ``root/browse/index.html`` (``mmloom browse``)."""
    from mmloom.curate.browse import write_site

    return write_site(root, config(root).download.encode_format, progress)


def stats(root: str) -> dict:
    """The funnel (``mmloom stats --json``)."""
    from mmloom.curate.stats import funnel

    return funnel(root)


def query(root: str, sql: str):
    """SQL over the dataset's DuckDB views (``mmloom query``), as a pandas DataFrame."""
    from mmloom.manifests.views import open_dataset, reading

    con = open_dataset(root)
    try:
        with reading(root):
            rel = con.sql(sql)
            if rel is None:
                raise UserError("mmloom.api.query returns rows: give a SELECT")
            return rel.df()
    finally:
        con.close()
