"""One Stage type and one driver: how every per-shard curation stage resumes.

In the spirit of datatrove's PipelineStep and NeMo Curator's ProcessingStage, a stage
only says what it is and how one shard is made:

* ``name`` (its completion records live in ``_commits/<name>/``) and ``out_dir``;
* ``section``: its part of the pipeline config, less ``ignore``, the keys that change
  how it runs but not what it writes (threads, batch sizes, devices, timeouts);
* ``shards(store, config)``: the shards it should have now (a ``UserError`` naming the
  command to run first when its inputs are missing);
* ``inputs(store, shard)``: the input files one shard is made from, as recorded with
  their sha256 by the stages before it;
* ``work``: a Ray task function, or an actor that holds models, that makes one shard and
  commits it with the hash it is given.

``run_stage`` owns the rest, the same for every stage: it finishes interrupted commits
and clears staging, hashes what each shard's output depends on (settings and inputs),
redoes exactly the shards whose record is missing, whose files changed, or whose hash
differs (and says which and why), forgets shards that are no longer wanted, runs the
rest through ``runner`` (the one module that talks to Ray), and returns the summary.
Stages never import Ray.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .runner import Resources, actor_count, run_shards, run_shards_on_actors
from mmloom.errors import UserError
from ..manifests.store import ShardStore, config_hash


@dataclass(frozen=True)
class Task:
    """A shard made by ``fn(shard, root=, cfg=, chash=, **extra)`` in a Ray task."""

    fn: Callable[..., dict]


@dataclass(frozen=True)
class Actors:
    """A shard made by ``factory(cfg=).<method>(shard, root=, chash=, **extra)`` in Ray
    actors that load their models once; ``what`` names the models for errors."""

    factory: Callable
    method: str = "run"
    what: str = "models"


@dataclass(frozen=True)
class Stage:
    name: str
    out_dir: str
    section: str
    shards: Callable[[ShardStore, Any], list[int]]
    inputs: Callable[[ShardStore, int], dict]
    work: Task | Actors
    resources: Callable[[Any], Resources] = lambda cfg: Resources()
    ignore: frozenset[str] = frozenset()
    extra: Callable[[ShardStore, Any], dict] = lambda store, config: {}  # more keyword arguments for the shard
    counts: tuple[str, ...] = ()  # record counts summed into the summary

    def settings(self, config) -> dict:
        """The part of the config this stage's output depends on."""
        return {k: v for k, v in getattr(config, self.section).model_dump(mode="json").items() if k not in self.ignore}

    def shard_hash(self, store: ShardStore, config, shard: int, settings: dict | None = None) -> str:
        return config_hash({"settings": self.settings(config) if settings is None else settings,
                            "inputs": self.inputs(store, shard)})


@dataclass
class Plan:
    shards: list[int]
    hashes: dict[int, str]
    todo: dict[int, str] = field(default_factory=dict)  # shard -> why it is (re)done
    stale: list[int] = field(default_factory=list)  # committed shards no longer wanted

    def reasons(self) -> dict[str, int]:
        return dict(Counter(self.todo.values()))


def plan(stage: Stage, store: ShardStore, config, redo: Callable[[int], str | None] | None = None) -> Plan:
    """Which shards to (re)do, and why."""
    shards = stage.shards(store, config)
    settings = stage.settings(config)
    p = Plan(shards, {s: stage.shard_hash(store, config, s, settings) for s in shards})
    wanted = set(shards)
    p.stale = [s for s in store.committed_shards(stage.name) if s not in wanted]
    for s in shards:
        rec = store.record(stage.name, s)
        if rec is None:
            p.todo[s] = "new"
        elif not store.matches(rec):
            p.todo[s] = "files changed"
        elif rec.get("config_hash") != p.hashes[s]:
            p.todo[s] = "settings or inputs changed"
        elif redo and (why := redo(s)):
            p.todo[s] = why
    return p


def run_stage(stage: Stage, root: str, config, ray_address: str | None = None, progress: bool = True,
              redo: Callable[[int], str | None] | None = None, options: dict | None = None) -> dict:
    """Run ``stage`` over the shards that need it; the summary every stage returns:
    shards, ran, skipped, failed, committed, redo reasons, summed record counts.
    ``redo(shard)`` may ask for an up-to-date shard again (with its reason); ``options``
    are passed to every shard."""
    store = ShardStore(root)
    store.clean_staging([stage.out_dir])  # finishes interrupted commits first (store.recover)
    p = plan(stage, store, config, redo)
    for s in p.stale:
        store.uncommit(stage.name, s)
    todo = sorted(p.todo)
    section = getattr(config, stage.section)
    kwargs = {"root": store.root, "hashes": p.hashes, **stage.extra(store, config), **(options or {})}
    res = stage.resources(section)
    if isinstance(stage.work, Task):
        run = run_shards(stage.name, todo, _task, {"fn": stage.work.fn, "cfg": section.model_dump(), **kwargs},
                         res, ray_address, progress)
    else:
        run = run_shards_on_actors(
            stage.name, todo, stage.work.factory, {"cfg": section.model_dump()}, "run_with_hash", kwargs,
            num_actors=actor_count(section, len(todo), ray_address), resources=res,
            ray_address=ray_address, progress=progress)
        init_errors = {f["error"] for f in run.failures if f.get("init_error")}
        if init_errors and not run.results:
            raise UserError(f"{stage.work.what} could not be loaded:\n  " + "\n  ".join(
                e.removeprefix("UserError: ") for e in sorted(init_errors)))
    store.clean_staging([stage.out_dir])  # leftovers of this run's failed attempts
    totals: Counter = Counter()
    for rec in store.records(stage.name):
        totals.update({k: v for k, v in rec["counts"].items() if not stage.counts or k in stage.counts})
    done = [r for r in run.results if not r.get("skipped")]
    return {
        "stage": stage.name,
        "shards": len(p.shards),
        "ran": len(done),
        "skipped": len(p.shards) - len(done) - len(run.failures),
        "failed": run.failures,
        "committed": len(store.committed_shards(stage.name)),
        "redo": p.reasons(),
        "dropped": p.stale,
        "counts": dict(totals),
        "results": run.results,
    }


def _task(shard: int, fn: Callable, cfg: dict, root: str, hashes: dict, **extra) -> dict:
    return fn(shard, root=root, cfg=cfg, chash=hashes[shard], **extra)


class ActorWorker:
    """Mixin for a stage's actor class: ``run_with_hash`` picks this shard's hash."""

    def run_with_hash(self, shard: int, root: str, hashes: dict, **extra) -> dict:
        return self.run(shard, root=root, chash=hashes[shard], **extra)
