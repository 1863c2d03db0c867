"""The one adapter between stages and Ray.

Stages are plain functions `fn(shard, **kwargs) -> dict` that never import Ray
(ARCHITECTURE.md, habit 3). `run_shards` turns a list of shard ids into Ray tasks with the
resources the stage declares, retries shards whose worker died, shows progress, and
returns one result per shard. The same code runs on a laptop (Ray started in process)
and on a cluster (`--ray-address`).
"""

from __future__ import annotations

import os
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from tqdm import tqdm

from mmloom import progress_enabled, verbose



def init_ray(address: str | None = None) -> None:
    """Start Ray in process, or connect to the cluster at ``address``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    if ray.is_initialized():
        return
    from mmloom.rayauth import configure_for

    configure_for(address)  # the cluster's auth mode, asked before connecting
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=verbose())  # failures come back as results
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", **kwargs)  # a new in-process cluster, never a stale `ray start` one


def _ray(address: str | None):
    """The ray module, connected (imported here only: stages never import Ray)."""
    import ray

    init_ray(address)
    return ray


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
    items: Counter = field(default_factory=Counter)  # summed "counts" of the finished shards (statuses)
    started: float = field(default_factory=time.perf_counter)

    def progress(self) -> str:
        """The bar's postfix from the finished shards' counts: rows, rows/s and the success
        rate so far (a 10,000-row shard takes long; the shard count alone says little)."""
        n = self.items.get("rows") or sum(v for k, v in self.items.items() if k != "rows")
        if not n:
            return ""
        rate = n / max(time.perf_counter() - self.started, 1e-9)
        ok = f", {self.items['success'] / n:.0%} success" if "success" in self.items else ""
        return f"{n:,} rows, {rate:,.1f}/s{ok}"

    def collect(self, ref, shard: int) -> dict:
        """File one finished task's result; a task whose worker died past its retries fails."""
        import ray

        try:
            out = ray.get(ref)
        except Exception as e:
            out = {"shard": shard, "ok": False, "error": f"worker lost: {type(e).__name__}: {e}"}
        (self.results if out["ok"] else self.failures).append(out)
        return out

    def collect_next(self, pending: dict, bar) -> list:
        """Wait for at least one of ``pending`` (task ref -> (worker, shard)) to finish, file
        its result, and return the workers that are free again."""
        import ray

        done, _ = ray.wait(list(pending), num_returns=1)
        freed = []
        for ref in done:
            worker, shard = pending.pop(ref)
            out = self.collect(ref, shard)
            freed.append(worker)
            if isinstance(out.get("counts"), dict):
                self.items.update({k: v for k, v in out["counts"].items() if isinstance(v, int)})
                bar.set_postfix_str(self.progress(), refresh=False)
            bar.update(1)
        return freed

    def sort(self) -> "ShardRun":
        self.results.sort(key=lambda r: r["shard"])
        self.failures.sort(key=lambda r: r["shard"])
        return self


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
    ray, res = _ray(ray_address), resources or Resources()
    task = ray.remote(_call).options(
        num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=res.max_retries, name=f"mmloom-{name}"
    )
    kw_ref = ray.put(kwargs or {})
    pending = {task.remote(fn, s, kw_ref): (None, s) for s in shards}
    bar = tqdm(total=len(shards), desc=name, unit="shard", disable=not progress_enabled(progress), leave=False)
    while pending:
        run.collect_next(pending, bar)
    bar.close()
    return run.sort()


def actor_count(cfg, n_shards: int, ray_address: str | None) -> int:
    """Actors for a model stage: ``cfg.num_workers`` if set, else as many as the cluster's
    GPUs (or CPUs) hold at ``gpus_per_worker`` (``cpus_per_worker``), at most one per shard."""
    if cfg.num_workers:
        return cfg.num_workers
    if cfg.gpus_per_worker > 0:
        import ray

        init_ray(ray_address)
        return max(1, int(ray.cluster_resources().get("GPU", 0) / cfg.gpus_per_worker))
    if ray_address:
        import ray

        init_ray(ray_address)
        cpus = ray.cluster_resources().get("CPU", 1)
    else:
        cpus = os.cpu_count() or 1
    return max(1, min(n_shards, int(cpus / cfg.cpus_per_worker)))


class _Host:
    """Holds one stage worker inside a Ray actor; its models load once, here."""

    def __init__(self, factory: Callable, init_kwargs: dict, threads: int):
        try:
            import torch

            torch.set_num_threads(max(1, threads))
        except ImportError:
            pass
        self.error = None
        try:
            self.obj = factory(**init_kwargs)
        except Exception as e:  # reported with every shard instead of killing the actor
            self.error = f"{type(e).__name__}: {e}"

    def call(self, method: str, shard: int, kwargs: dict) -> dict:
        if self.error:
            return {"shard": shard, "ok": False, "error": self.error, "init_error": True}
        return _call(getattr(self.obj, method), shard, kwargs)


def run_shards_on_actors(
    name: str,
    shards: list[int],
    factory: Callable,
    init_kwargs: dict,
    method: str,
    kwargs: dict | None = None,
    num_actors: int = 1,
    resources: Resources | None = None,
    ray_address: str | None = None,
    progress: bool = True,
) -> ShardRun:
    """Like `run_shards`, for stages whose workers hold models: ``num_actors`` actors each
    build ``factory(**init_kwargs)`` once, then take shards as they free up."""
    run = ShardRun()
    if not shards:
        return run
    ray, res = _ray(ray_address), resources or Resources()
    Host = ray.remote(_Host).options(
        num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=res.max_retries,
        max_task_retries=res.max_retries, name=None,
    )
    actors = [Host.remote(factory, init_kwargs, int(res.num_cpus)) for _ in range(max(1, min(num_actors, len(shards))))]
    kw_ref = ray.put(kwargs or {})
    queue = list(shards)
    pending: dict = {}
    idle = list(actors)
    bar = tqdm(total=len(shards), desc=name, unit="shard", disable=not progress_enabled(progress), leave=False)
    while queue or pending:
        while idle and queue:
            a, s = idle.pop(), queue.pop(0)
            pending[a.call.remote(method, s, kw_ref)] = (a, s)
        idle.extend(run.collect_next(pending, bar))
    bar.close()
    for a in actors:
        ray.kill(a)
    return run.sort()
