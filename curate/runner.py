"""The one adapter between stages and Ray.

Stages are plain functions `fn(shard, **kwargs) -> dict` that never import Ray
(STYLE habit 3). `run_shards` turns a list of shard ids into Ray tasks with the
resources the stage declares, retries shards whose worker died, shows progress, and
returns one result per shard. The same code runs on a laptop (Ray started in process)
and on a cluster (`--ray-address`).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from tqdm import tqdm


def init_ray(address: str | None = None) -> None:
    """Start Ray in process, or connect to the cluster at ``address``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(**kwargs)


@dataclass
class Resources:
    """What one task of a stage asks of the cluster."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 3  # retries after a worker or node died


@dataclass
class ShardRun:
    results: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)


def _call(fn: Callable, shard: int, kwargs: dict) -> dict:
    try:
        out = fn(shard, **kwargs)
        return {"shard": shard, "ok": True, **(out or {})}
    except Exception as e:  # a shard's failure is reported, not raised out of the job
        return {"shard": shard, "ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def run_shards(
    name: str,
    shards: list[int],
    fn: Callable[..., dict],
    kwargs: dict | None = None,
    resources: Resources | None = None,
    ray_address: str | None = None,
    progress: bool = True,
) -> ShardRun:
    """Run ``fn(shard, **kwargs)`` for every shard as a Ray task."""
    run = ShardRun()
    if not shards:
        return run
    import ray

    init_ray(ray_address)
    res = resources or Resources()
    task = ray.remote(_call).options(
        num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=res.max_retries, name=f"mmloom-{name}"
    )
    kw_ref = ray.put(kwargs or {})
    pending = {task.remote(fn, s, kw_ref): s for s in shards}
    bar = tqdm(total=len(shards), desc=name, unit="shard", disable=not progress, leave=False)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            shard = pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as e:  # the worker died more times than max_retries
                out = {"shard": shard, "ok": False, "error": f"worker lost: {type(e).__name__}: {e}"}
            (run.results if out["ok"] else run.failures).append(out)
            bar.update(1)
    bar.close()
    run.results.sort(key=lambda r: r["shard"])
    run.failures.sort(key=lambda r: r["shard"])
    return run
