"""`mmloom run PIPELINE.yaml`: ingest, download, score, select, ground and build in order,
each resuming where it stopped (committed shards are skipped), from one YAML."""

from __future__ import annotations

import os
import sys

from mmloom.curate.config import load_config
from mmloom.curate.dataset import save_dataset_config
from mmloom.errors import UserError


def run_pipeline(pipeline: str, out: str | None, ray_address: str | None, progress: bool = True, echo=print) -> int:
    cfg = load_config(pipeline)
    out = out or cfg.run.out
    if not out:
        raise UserError(f"{pipeline}: run.out is not set (or pass --out DIR)")
    ray_address = ray_address or cfg.run.ray_address
    base = os.path.dirname(os.path.abspath(pipeline))
    sources = [s if os.path.isabs(s) or "://" in s else os.path.join(base, s) for s in cfg.run.sources]
    from mmloom.manifests.lock import writer_lock

    with writer_lock(out, "run " + os.path.basename(pipeline)):
        return _run_stages(cfg, pipeline, out, sources, ray_address, progress, echo)


def _run_stages(cfg, pipeline: str, out: str, sources: list[str], ray_address: str | None, progress: bool, echo) -> int:
    from mmloom.curate.build import build
    from mmloom.curate.card import write_card
    from mmloom.curate.download import download
    from mmloom.curate.ground import ground
    from mmloom.curate.ingest import ingest
    from mmloom.curate.score import score
    from mmloom.curate.stats import funnel, render
    from mmloom.curate.select import render_funnel, select

    save_dataset_config(out, cfg)
    for stage in cfg.run.stages:
        if stage == "ingest":
            if not sources:
                raise UserError(f"{pipeline}: run.sources is empty")
            s = ingest(sources, out, cfg, ray_address, progress)
            echo(f"[ingest] {s['input_rows']} rows, {s['duplicates']} duplicates, {s['shards']} shards: {s['status_counts']}")
            continue
        if stage == "select":
            echo("[select] " + render_funnel(select(out, cfg)))
            continue
        fn = {"download": download, "score": score, "ground": ground, "build": build}[stage]
        s = fn(out, cfg, ray_address, progress=progress)
        echo(f"[{stage}] {s.get('ran', 0)} shard(s) run, {s.get('skipped', 0)} already done")
        if s.get("failed"):
            for f in s["failed"]:
                echo(f"  shard {f['shard']} FAILED: {f['error']}", file=sys.stderr)
            echo(f"[{stage}] stopped: rerun `mmloom run {pipeline}` to retry the failed shards", file=sys.stderr)
            return 1
    if "build" in cfg.run.stages:
        echo(f"[card] {write_card(out, cfg)}")
    echo(render(funnel(out)))
    return 0
