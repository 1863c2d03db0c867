"""The pipeline's stages, in order: the one list that `mmloom <stage>`, `mmloom run` and
the demo are built from.

Each entry says how to run the stage on a dataset directory (per-shard stages through
``stage.run_stage``; ingest and select are global: one DuckDB pass each), the options
its command takes (each a config key, so a flag and the YAML say the same thing), and
how its summary reads. Adding a stage: one module with its ``STAGE_DEF`` and work, one
entry here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from mmloom.configbase import Option, add_options, split_options


@dataclass(frozen=True)
class StageEntry:
    name: str
    help: str
    run: Callable[..., dict]  # (root, config, ray_address, progress, **options) -> summary
    lines: Callable[[dict], list[str]]  # the summary a person reads, first line first
    options: tuple[Option, ...] = ()
    uses_ray: bool = True
    sources: bool = False  # takes metadata sources and --out (ingest) instead of DIR

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        from .config import PipelineConfig

        add_options(p, self.options, PipelineConfig)

    def split_args(self, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config overrides, run keywords) from parsed arguments; None = not given."""
        return split_options(args, self.options)


def _counts(d: dict, width: int = 18) -> list[str]:
    return [f"  {k:<{width}} {v}" for k, v in sorted(d.items())]


def _redo(s: dict) -> str:
    """Why shards were redone, when it is not simply that they were new."""
    why = {r: n for r, n in (s.get("redo") or {}).items() if r != "new"}
    return (" (" + ", ".join(f"{n} {r}" for r, n in sorted(why.items())) + ")") if why else ""


def _run_ingest(root, config, ray_address=None, progress=True, sources=()):
    from .ingest import ingest
    from mmloom.errors import UserError

    if not sources:
        raise UserError("ingest needs metadata sources (run.sources, or `mmloom ingest SOURCE... --out DIR`)")
    return ingest(list(sources), root, config, ray_address, progress)


def _ingest_lines(s: dict) -> list[str]:
    head = [f"{s.get('out', 'dataset')}: already ingested from these inputs; nothing to do"] if s.get("skipped") else []
    return head + [f"ingest: {len(s['files'])} file(s) ({', '.join(s['formats'])}), {s['input_rows']} rows, "
                   f"{s['duplicates']} duplicates dropped, {s['rows']} rows in {s['shards']} shards",
                   *_counts(s["status_counts"], 12)]


def _run_download(root, config, ray_address=None, progress=True, retry_failed=False):
    from .download import download

    return download(root, config, ray_address, bool(retry_failed), progress)


def _run_score(root, config, ray_address=None, progress=True):
    from .score import score

    return score(root, config, ray_address, progress)


def _run_select(root, config, ray_address=None, progress=True, dry_run=False, show_sql=False):
    from .select import select

    f = select(root, config, dry_run=bool(dry_run))
    f.update(dry_run=bool(dry_run), show_sql=bool(show_sql), out=root)
    return f


def _select_lines(f: dict) -> list[str]:
    from .select import render_funnel

    return ([f["sql"]] if f.get("show_sql") else []) + render_funnel(f).splitlines() + [
        "(dry run: nothing written)" if f.get("dry_run") else f"wrote {f.get('out')}/selected/ and rejects/ (the reject ledger)"]


def _run_ground(root, config, ray_address=None, progress=True):
    from .ground import ground

    return ground(root, config, ray_address, progress)


def _run_build(root, config, ray_address=None, progress=True):
    from .build import build
    from .card import write_card

    s = build(root, config, ray_address, progress)
    s["card"] = write_card(root, config)
    return s


DEVICE: dict = {}

STAGES: list[StageEntry] = [
    StageEntry(
        "ingest", "metadata parquet (LAION, COYO, any url+caption) -> candidate shards", _run_ingest, _ingest_lines,
        (Option(("--format",), "ingest.format", {"choices": ["auto", "laion", "coyo", "generic"]}),
         Option(("--url-col",), "ingest.url_col", {"help": "url column of a generic table"}),
         Option(("--caption-col",), "ingest.caption_col", {"help": "caption column of a generic table"}),
         Option(("--shard-size",), "ingest.shard_size", {"type": int, "help": "rows per shard"})), sources=True),
    StageEntry(
        "download", "download candidate images with img2dataset into webdataset shards", _run_download,
        lambda s: [f"download: {s['ran']} shard(s) downloaded{_redo(s)}, {s['skipped']} already done, "
                   f"{s['committed']}/{s['shards']} committed", *_counts(s["status_counts"])],
        (Option(("--retry-failed",), "retry_failed", {"action": "store_true", "help": "re-fetch samples whose download failed"}),
         Option(("--allow-private-addresses",), "download.allow_private_addresses",
                {"action": "store_const", "const": True, "help": "allow URLs on private/loopback addresses"}),
         Option(("--image-size",), "download.image_size", {"type": int}),
         Option(("--resize-mode",), "download.resize_mode", {"choices": ["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]}),
         Option(("--timeout",), "download.timeout", {"type": float}),
         Option(("--deadline",), "download.deadline", {"type": float}),
         Option(("--max-body-bytes",), "download.max_body_bytes", {"type": int}),
         Option(("--retries",), "download.retries", {"type": int}),
         Option(("--thread-count",), "download.thread_count", {"type": int}))),
    StageEntry(
        "score", "score downloaded images (CLIP, NSFW, watermark, aesthetic, faces, phash, captions)", _run_score,
        lambda s: [f"score: {s['ran']} shard(s) scored ({s['rows']} images){_redo(s)}, {s['skipped']} already done, "
                   f"{s['committed']}/{s['shards']} downloaded shards scored"],
        (Option(("--batch-size",), "score.batch_size", {"type": int}), Option(("--device",), "score.device", DEVICE))),
    StageEntry(
        "select", "apply thresholds with one DuckDB query; write selected/ and the reject ledger rejects/", _run_select,
        _select_lines,
        (Option(("--dry-run",), "dry_run", {"action": "store_true", "help": "print the funnel per rule, write nothing"}),
         Option(("--show-sql",), "show_sql", {"action": "store_true", "help": "print the compiled query"})),
        uses_ray=False),
    StageEntry(
        "ground", "ground caption phrases with Grounding DINO (or boxes supplied with the metadata) -> detections/", _run_ground,
        lambda s: [f"ground: {s['ran']} shard(s) grounded ({s['boxes']} boxes){_redo(s)}, {s['skipped']} up to date, "
                   f"{s['committed']}/{s['shards']} committed",
                   *([f"  supplied boxes refused: {', '.join(f'{n} {k}' for k, n in sorted(s['refused_boxes'].items()))}"]
                     if s.get("refused_boxes") else [])],
        (Option(("--batch-size",), "ground.batch_size", {"type": int}), Option(("--device",), "ground.device", DEVICE))),
    StageEntry(
        "build", "apply the crop rules and write final/ interleaved-prompt shards and the dataset card", _run_build,
        lambda s: [f"build: {s['ran']} shard(s) built{_redo(s)}, {s['skipped']} up to date; {s['built']} of {s['samples']} "
                   f"selected samples in final/ with {s['crops']} crops; dataset card {s['card']}"]),
]

BY_NAME = {s.name: s for s in STAGES}
NAMES = [s.name for s in STAGES]
