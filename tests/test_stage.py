"""The one resume rule (curate/stage.py): a shard is redone when its record is missing, its
files changed, or what its output depends on (settings, inputs) changed, and only then."""

from __future__ import annotations

import os

import pytest
from pydantic import Field

from mmloom.configbase import Section
from mmloom.curate.config import PipelineConfig
from mmloom.curate.stage import Stage, Task, plan, run_stage
from mmloom.curate.stages import STAGES
from mmloom.manifests.store import ShardStore


class ToySection(Section):
    factor: int = Field(2, description="what the output depends on")
    threads: int = Field(4, description="how it runs")


class ToyConfig(Section):
    toy: ToySection = Field(default_factory=ToySection)


def make_shard(shard: int, root: str, cfg: dict, chash: str) -> dict:
    store = ShardStore(root)
    src = store.read_verified("src", shard, f"src/{shard:05d}.txt")
    staging = store.staging_dir("toy", shard)
    out = os.path.join(staging, "out.txt")
    with open(out, "w") as f:
        f.write(str(int(src) * cfg["factor"]))
    store.commit("toy", shard, {f"toy/{shard:05d}.txt": out}, {"rows": 1}, chash)
    store.discard(staging)
    return {}


def _by_value():
    """Ray workers can't import this test module: ship its functions by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def toy_stage(wanted=(0, 1, 2)) -> Stage:
    _by_value()
    return Stage(name="toy", out_dir="toy", section="toy", shards=lambda store, cfg: list(wanted),
                 inputs=lambda store, s: store.record("src", s)["files"], work=Task(make_shard),
                 ignore=frozenset({"threads"}))


def write_src(store: ShardStore, shard: int, value: int) -> None:
    staging = store.staging_dir("src", shard)
    p = os.path.join(staging, "v.txt")
    with open(p, "w") as f:
        f.write(str(value))
    store.commit("src", shard, {f"src/{shard:05d}.txt": p}, {"rows": 1}, "src")
    store.discard(staging)


@pytest.mark.usefixtures("ray_local")
def test_only_what_changed_is_redone_and_the_summary_says_why(tmp_path):
    store = ShardStore(str(tmp_path / "ds"))
    for s in range(3):
        write_src(store, s, s + 1)
    cfg = ToyConfig()
    out = lambda s: open(store.path(f"toy/{s:05d}.txt")).read()  # noqa: E731

    first = run_stage(toy_stage(), store.root, cfg, progress=False)
    assert (first["ran"], first["skipped"], first["redo"]) == (3, 0, {"new": 3})
    assert [out(s) for s in range(3)] == ["2", "4", "6"]

    again = run_stage(toy_stage(), store.root, cfg, progress=False)
    assert (again["ran"], again["skipped"], again["redo"]) == (0, 3, {})

    cfg.toy.threads = 16  # how it runs: nothing to redo
    assert run_stage(toy_stage(), store.root, cfg, progress=False)["ran"] == 0

    cfg.toy.factor = 10  # what it writes: every shard
    changed = run_stage(toy_stage(), store.root, cfg, progress=False)
    assert (changed["ran"], changed["redo"]) == (3, {"settings or inputs changed": 3})
    assert [out(s) for s in range(3)] == ["10", "20", "30"]

    write_src(store, 1, 7)  # one input changed: that shard alone
    one = run_stage(toy_stage(), store.root, cfg, progress=False)
    assert (one["ran"], one["skipped"]) == (1, 2) and out(1) == "70"

    with open(store.path("toy/00002.txt"), "a") as f:  # a damaged output file
        f.write("0")
    assert plan(toy_stage(), store, cfg).todo == {2: "files changed"}

    dropped = run_stage(toy_stage(wanted=(0, 1)), store.root, cfg, progress=False)
    assert dropped["dropped"] == [2] and store.committed_shards("toy") == [0, 1]


def test_pipeline_stages_hash_what_their_output_depends_on():
    """Changing a model or a threshold redoes a stage; threads, batch sizes and devices do not."""
    from mmloom.curate.build import STAGE_DEF as BUILD
    from mmloom.curate.download import STAGE_DEF as DOWNLOAD
    from mmloom.curate.ground import STAGE_DEF as GROUND
    from mmloom.curate.score import STAGE_DEF as SCORE

    base = PipelineConfig()
    cases = [
        (SCORE, {"score": {"clip": {"model": "ViT-L-14/openai"}}}, True),
        (SCORE, {"score": {"batch_size": 64, "device": "cuda", "num_workers": 3}}, False),
        (DOWNLOAD, {"download": {"image_size": 512}}, True),
        (DOWNLOAD, {"download": {"thread_count": 8, "timeout": 3.0, "deadline": 9.0}}, False),
        (GROUND, {"ground": {"box_threshold": 0.5}}, True),
        (GROUND, {"ground": {"batch_size": 2}}, False),
        (BUILD, {"build": {"max_crops": 2}}, True),
        (BUILD, {"build": {"card_examples": 9}}, False),
    ]
    for stage, change, redo in cases:
        other = PipelineConfig.model_validate({**base.model_dump(), **{k: {**base.model_dump()[k], **v} for k, v in change.items()}})
        assert (stage.settings(other) != stage.settings(base)) is redo, (stage.name, change)


def test_the_stage_list_drives_the_cli_and_run():
    from mmloom.cli import build_parser
    from mmloom.curate.config import RunConfig

    names = [s.name for s in STAGES]
    assert names == ["ingest", "download", "score", "select", "ground", "build"]
    assert RunConfig().stages == names
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(names) <= set(sub.choices)


def test_the_shard_bar_counts_rows_and_the_success_rate(monkeypatch):
    """A 10,000-row shard takes long: the bar's postfix adds each finished shard's counts
    (rows, rows/s, success rate so far), not only the shard count."""
    import sys
    import types

    from mmloom.curate import runner

    results = {"a": {"shard": 0, "ok": True, "counts": {"success": 8, "failed_to_download": 2}},
               "b": {"shard": 1, "ok": True, "counts": {"success": 5, "failed_to_resize": 5}}}
    fake = types.SimpleNamespace(wait=lambda refs, num_returns: ([refs[0]], refs[1:]), get=lambda ref: results[ref])
    monkeypatch.setitem(sys.modules, "ray", fake)

    class Bar:
        postfix = ""

        def set_postfix_str(self, s, refresh=True):
            self.postfix = s

        def update(self, n):
            pass

    run, bar, pending = runner.ShardRun(), Bar(), {"a": (None, 0), "b": (None, 1)}
    run.collect_next(pending, bar)
    assert bar.postfix.startswith("10 rows, ") and bar.postfix.endswith("/s, 80% success")
    run.collect_next(pending, bar)
    assert bar.postfix.startswith("20 rows, ") and bar.postfix.endswith("/s, 65% success")
