"""`mmloom run PIPELINE.yaml`: the stages of curate/stages.py in order (``run.stages``),
each resuming where it stopped (``stage.run_stage`` redoes only what changed), from one
YAML, under the dataset's writer lock."""

from __future__ import annotations

import os
import sys

from .config import load_config
from .dataset import save_dataset_config
from mmloom.errors import UserError


def run_pipeline(pipeline: str, out: str | None, ray_address: str | None, progress: bool = True, echo=print) -> int:
    cfg = load_config(pipeline)
    out = out or cfg.run.out
    if not out:
        raise UserError(f"{pipeline}: run.out is not set (or pass --out DIR)")
    ray_address = ray_address or cfg.run.ray_address
    base = os.path.dirname(os.path.abspath(pipeline))
    sources = [s if os.path.isabs(s) or "://" in s else os.path.join(base, s) for s in cfg.run.sources]
    from ..manifests.lock import writer_lock

    with writer_lock(out, "run " + os.path.basename(pipeline)):
        return _run_stages(cfg, pipeline, out, sources, ray_address, progress, echo)


def run_stages(cfg, out: str, stages: list[str], sources: list[str], ray_address: str | None, progress: bool,
               echo=print, on_failure: str = "rerun the command") -> dict[str, dict]:
    """Run ``stages`` (names from curate/stages.py, in the given order) on ``out``: each
    prints its summary, and a stage with failed shards stops the run, naming them.
    Used by `mmloom run` and by the demo. Returns each stage's summary."""
    from .stages import BY_NAME

    save_dataset_config(out, cfg)
    done: dict[str, dict] = {}
    for name in stages:
        entry = BY_NAME[name]
        s = entry.run(out, cfg, ray_address, progress, **({"sources": sources} if entry.sources else {}))
        s["out"] = out
        lines = entry.lines(s)
        echo(f"[{name}] " + (lines[0].removeprefix(f"{name}: ") if lines else "done"))
        for line in lines[1:]:
            echo(f"    {line}")
        done[name] = s
        if report_failures(s):
            raise StageFailed(f"[{name}] stopped: {on_failure} to retry the failed shards")
    return done


def report_failures(summary: dict, hint: str = "") -> bool:
    """Each failed shard of a stage's summary on stderr (the one place that prints them,
    for `mmloom <stage>`, `mmloom run` and the demo); True when any failed."""
    failed = summary.get("failed") or []
    for f in failed:
        print(f"  shard {f['shard']} FAILED: {f['error']}" + (f" ({hint})" if hint else ""), file=sys.stderr)
    return bool(failed)


class StageFailed(UserError):
    pass


def _run_stages(cfg, pipeline: str, out: str, sources: list[str], ray_address: str | None, progress: bool, echo) -> int:
    from .stats import funnel, render

    if "ingest" in cfg.run.stages and not sources:
        raise UserError(f"{pipeline}: run.sources is empty")
    try:
        run_stages(cfg, out, cfg.run.stages, sources, ray_address, progress, echo, f"rerun `mmloom run {pipeline}`")
    except StageFailed as e:
        print(str(e), file=sys.stderr)
        return 1
    echo(render(funnel(out)))
    return 0
