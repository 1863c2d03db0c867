"""The `mmloom` command: one subcommand per stage, plus query, stats and demo.

User mistakes (`UserError`) print one clear line and exit 2; a failed shard makes the
command exit 1 after its summary; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmloom.errors import UserError


def _common(p: argparse.ArgumentParser, ray: bool = True) -> None:
    p.add_argument("--config", help="pipeline YAML (default: DIR/mmloom.yaml if present, else built-in defaults)")
    if ray:
        p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start Ray in this process)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def report_failures(failed: list[dict]) -> int:
    """Failed shards go to stderr; the exit status says whether any failed."""
    for f in failed:
        print(f"  shard {f['shard']} FAILED: {f['error']} (rerun to retry)", file=sys.stderr)
    return 1 if failed else 0


def writes(dir_attr: str):
    """Run a command that writes the dataset at ``args.<dir_attr>`` under its writer lock
    (manifests/lock.py): a second writer on the same directory stops with one line."""
    def wrap(fn):
        def run(a) -> int:
            from mmloom.manifests.lock import writer_lock

            if getattr(a, "dry_run", False):
                return fn(a)
            with writer_lock(getattr(a, dir_attr), a.command):
                return fn(a)
        run.__name__ = fn.__name__
        run.__doc__ = fn.__doc__
        return run
    return wrap


@writes("out")
def cmd_ingest(a) -> int:
    from mmloom.curate.dataset import dataset_config, save_dataset_config
    from mmloom.curate.ingest import ingest

    cfg = dataset_config(a.out, a.config, {
        "ingest.format": a.format, "ingest.url_col": a.url_col,
        "ingest.caption_col": a.caption_col, "ingest.shard_size": a.shard_size,
    })
    s = ingest(a.sources, a.out, cfg, a.ray_address, not a.no_progress)
    save_dataset_config(a.out, cfg)
    if s.get("skipped"):
        print(f"{a.out}: already ingested from these inputs; nothing to do")
    print(f"ingest: {len(s['files'])} file(s) ({', '.join(s['formats'])}), {s['input_rows']} rows, "
          f"{s['duplicates']} duplicates dropped, {s['rows']} rows in {s['shards']} shards")
    for k, v in sorted(s["status_counts"].items()):
        print(f"  {k:<12} {v}")
    return 0


@writes("dir")
def cmd_download(a) -> int:
    from mmloom.curate.dataset import dataset_config, save_dataset_config
    from mmloom.curate.download import download

    cfg = dataset_config(a.dir, a.config, {
        "download.allow_private_addresses": True if a.allow_private_addresses else None,
        "download.image_size": a.image_size, "download.resize_mode": a.resize_mode,
        "download.timeout": a.timeout, "download.retries": a.retries, "download.thread_count": a.thread_count,
    })
    s = download(a.dir, cfg, a.ray_address, a.retry_failed, not a.no_progress)
    save_dataset_config(a.dir, cfg)
    print(f"download: {s['ran']} shard(s) downloaded, {s['skipped']} already done, "
          f"{s['committed']}/{s['shards']} committed")
    for k, v in sorted(s["status_counts"].items()):
        print(f"  {k:<18} {v}")
    return report_failures(s["failed"])


@writes("dir")
def cmd_score(a) -> int:
    from mmloom.curate.dataset import dataset_config, save_dataset_config
    from mmloom.curate.score import score

    cfg = dataset_config(a.dir, a.config, {"score.batch_size": a.batch_size, "score.device": a.device})
    s = score(a.dir, cfg, a.ray_address, not a.no_progress)
    save_dataset_config(a.dir, cfg)
    print(f"score: {s['ran']} shard(s) scored ({s['rows']} images), {s['skipped']} already done, "
          f"{s['committed']}/{s['shards']} downloaded shards scored")
    return report_failures(s["failed"])


@writes("dir")
def cmd_select(a) -> int:
    from mmloom.curate.dataset import dataset_config, save_dataset_config
    from mmloom.filters.select import render_funnel, select

    cfg = dataset_config(a.dir, a.config)
    f = select(a.dir, cfg, dry_run=a.dry_run)
    if a.show_sql:
        print(f["sql"])
    print(render_funnel(f))
    if a.dry_run:
        print("(dry run: nothing written)")
    else:
        save_dataset_config(a.dir, cfg)
        print(f"wrote {a.dir}/selection/selected.parquet and rejects.parquet")
    return 0


@writes("dir")
def cmd_ground(a) -> int:
    from mmloom.curate.dataset import dataset_config, save_dataset_config
    from mmloom.curate.ground import ground

    cfg = dataset_config(a.dir, a.config, {"ground.batch_size": a.batch_size, "ground.device": a.device})
    s = ground(a.dir, cfg, a.ray_address, not a.no_progress)
    save_dataset_config(a.dir, cfg)
    print(f"ground: {s['ran']} shard(s) grounded ({s['boxes']} boxes), {s['skipped']} up to date, "
          f"{s['committed']}/{s['shards']} committed")
    return report_failures(s["failed"])


@writes("dir")
def cmd_build(a) -> int:
    from mmloom.curate.build import build
    from mmloom.curate.card import write_card
    from mmloom.curate.dataset import dataset_config, save_dataset_config

    cfg = dataset_config(a.dir, a.config)
    s = build(a.dir, cfg, a.ray_address, not a.no_progress)
    save_dataset_config(a.dir, cfg)
    card = write_card(a.dir, cfg)
    print(f"build: {s['ran']} shard(s) built, {s['skipped']} up to date; {s['built']} of {s['samples']} selected "
          f"samples in final/ with {s['crops']} crops; dataset card {card}")
    return report_failures(s["failed"])


def cmd_run(a) -> int:
    from mmloom.curate.run import run_pipeline

    return run_pipeline(a.pipeline, a.out, a.ray_address, not a.no_progress)


def cmd_train(a) -> int:
    from mmloom.configbase import load_model
    from mmloom.train.config import TrainConfig
    from mmloom.train.loop import train

    cfg = load_model(TrainConfig, a.config, {"loop.out": a.out, "loop.steps": a.steps, "data.shards": a.shards,
                                             "data.allow_pipe": True if a.allow_pipe else None})
    r = train(cfg)
    last = r["history"][-1] if r["history"] else {}
    skipped = (f"; {r['corrupt_samples']} sample(s) skipped, {r['skipped_members']} unknown tar member(s) dropped unread"
               if r["corrupt_samples"] or r["skipped_members"] else "")
    print(f"train: {r['steps']} steps in {r['out']}; last loss {last.get('loss', float('nan')):.4f}, "
          f"{last.get('images_per_s', 0):.2f} images/s" + (f", MFU {last['mfu']:.1%}" if "mfu" in last else "") + skipped)
    return 0


def cmd_sample(a) -> int:
    from mmloom.train.sample import parse_settings, sample

    out = a.out or ("samples.txt" if a.text else "samples.png")
    out = sample(a.checkpoint, a.prompt, out, a.seeds, a.steps, a.guidance, a.size, theta=a.theta,
                 settings=parse_settings(a.set), text=a.text)
    if a.text:
        print(open(out).read(), end="")
    print(f"sample: {len(a.seeds)} {'sentence' if a.text else 'image'}(s) -> {out}")
    return 0


def _require_dataset(root: str) -> None:
    from mmloom.manifests.store import ShardStore

    store = ShardStore(root)
    if not store.fs.isdir(store.base):
        raise UserError(f"no dataset directory {root}")


def cmd_verify(a) -> int:
    from mmloom.manifests.verify import verify

    _require_dataset(a.dir)
    if a.repair:
        from mmloom.manifests.lock import writer_lock

        with writer_lock(a.dir, "verify --repair"):
            rep = verify(a.dir, True, not a.no_progress)
    else:
        rep = verify(a.dir, False, not a.no_progress)
    for line in rep.pending:
        print(f"  {line}" if a.repair else f"  interrupted commit: {line} (`--repair` finishes or abandons it)")
    for p in rep.problems:
        print(f"BAD {p.line()}")
    print(f"verify: {rep.files} file(s), {rep.bytes / 2**20:.1f} MiB checked against their completion records; "
          f"{len(rep.problems)} bad")
    if rep.repaired:
        shards = ", ".join(f"{s} {n:05d}" if n >= 0 else "ingest summary" for s, n in rep.repaired)
        print(f"repair: marked not done: {shards}; rerun those stages (or `mmloom run`) to redo them")
    elif rep.problems:
        print(f"rerun with `mmloom verify {a.dir} --repair` to mark the affected shards not done")
    return 1 if rep.problems and not a.repair else 0


def cmd_query(a) -> int:
    import duckdb

    from mmloom.manifests.views import open_dataset, reading, view_names

    _require_dataset(a.dir)
    con = open_dataset(a.dir)
    try:
        with reading(a.dir):  # a damaged committed file: one line naming it
            rel = con.sql(a.sql)
            if rel is None:
                return 0
            if a.format == "table":
                rel.show(max_width=200, max_rows=a.max_rows)
            else:
                df = rel.df()
                if a.format == "csv":
                    df.to_csv(sys.stdout, index=False)
                else:
                    print(df.to_json(orient="records", indent=1, default_handler=str))
    except duckdb.Error as e:
        raise UserError(f"query failed: {e}\n(views in {a.dir}: {', '.join(view_names(con)) or 'none yet'})") from None
    return 0


def cmd_stats(a) -> int:
    from mmloom.curate.stats import funnel, render

    _require_dataset(a.dir)
    f = funnel(a.dir)
    print(json.dumps(f, indent=1, default=str) if a.json else render(f))
    return 0


def cmd_clean_caption(a) -> int:
    from mmloom.curate.captions import clean_caption

    rc = 0
    for text in a.text:
        out, reason = clean_caption(text)
        print(out)
        if reason:
            print(f"mmloom clean-caption: {reason}: {text!r}", file=sys.stderr)
            rc = 1
    return rc


def cmd_demo(a) -> int:
    from mmloom.curate.demo import run_demo

    run_demo(a.out, a.ray_address, not a.no_progress, family=a.family)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mmloom.train.families import FAMILIES  # the registry's names (no family module is imported)

    p = argparse.ArgumentParser(prog="mmloom", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ingest", help="metadata parquet (LAION, COYO, any url+caption) -> candidate shards")
    s.add_argument("sources", nargs="+", help="parquet files, globs or directories")
    s.add_argument("--out", required=True, help="dataset directory")
    s.add_argument("--format", choices=["auto", "laion", "coyo", "generic"], default=None)
    s.add_argument("--url-col", default=None, help="url column of a generic table")
    s.add_argument("--caption-col", default=None, help="caption column of a generic table")
    s.add_argument("--shard-size", type=int, default=None, help="rows per shard")
    _common(s)
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser("download", help="download candidate images with img2dataset into webdataset shards")
    s.add_argument("dir")
    s.add_argument("--retry-failed", action="store_true", help="re-fetch samples whose download failed")
    s.add_argument("--allow-private-addresses", action="store_true", help="allow URLs on private/loopback addresses")
    s.add_argument("--image-size", type=int, default=None)
    s.add_argument("--resize-mode", default=None, choices=["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"])
    s.add_argument("--timeout", type=float, default=None)
    s.add_argument("--retries", type=int, default=None)
    s.add_argument("--thread-count", type=int, default=None)
    _common(s)
    s.set_defaults(fn=cmd_download)

    s = sub.add_parser("score", help="score downloaded images (CLIP, NSFW, watermark, aesthetic, faces, phash, captions)")
    s.add_argument("dir")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
    _common(s)
    s.set_defaults(fn=cmd_score)

    s = sub.add_parser("select", help="apply thresholds with one DuckDB query; write selection/ and the reject ledger")
    s.add_argument("dir")
    s.add_argument("--dry-run", action="store_true", help="print the funnel per rule, write nothing")
    s.add_argument("--show-sql", action="store_true", help="print the compiled query")
    _common(s, ray=False)
    s.set_defaults(fn=cmd_select)

    s = sub.add_parser("ground", help="ground caption phrases with Grounding DINO -> detections/")
    s.add_argument("dir")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--device", default=None)
    _common(s)
    s.set_defaults(fn=cmd_ground)

    s = sub.add_parser("build", help="apply the crop rules and write final/ interleaved-prompt shards and the dataset card")
    s.add_argument("dir")
    _common(s)
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("run", help="run every stage from one pipeline YAML, resuming where it stopped")
    s.add_argument("pipeline", help="pipeline YAML (see configs/laion.yaml, configs/coyo.yaml)")
    s.add_argument("--out", default=None, help="dataset directory (overrides run.out)")
    s.add_argument("--ray-address", default=None)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("train", help="train a model family on final/ shards (accelerate; `accelerate launch -m mmloom train` for DDP/FSDP)")
    s.add_argument("config", help="trainer YAML (see configs/train/)")
    s.add_argument("--shards", default=None, help="overrides data.shards")
    s.add_argument("--out", default=None, help="overrides loop.out")
    s.add_argument("--steps", type=int, default=None, help="overrides loop.steps")
    s.add_argument("--allow-pipe", action="store_true",
                   help="allow pipe: shard URLs, which webdataset runs as shell commands (data.allow_pipe)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="sample images from a checkpoint with an interleaved prompt")
    s.add_argument("checkpoint", help="a run directory or one of its checkpoints")
    s.add_argument("--prompt", required=True, help='e.g. "a <image:man.jpg> man and his <image:dog.jpg> dog"')
    s.add_argument("--out", default=None, help="PNG grid (default samples.png), or text file with --text (samples.txt)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    s.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the family's, model.sampling.steps of the run's config, from its paper)")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the family's, model.sampling.guidance of the run's config)")
    s.add_argument("--size", type=int, default=None, help="image size (default: the training resolution)")
    s.add_argument("--theta", type=float, nargs="+", default=None,
                   help="M-VADER attention factors: one value for every image segment, or one per prompt segment (0 removes it)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override the run's config for sampling, e.g. model.sampling.sampler=ddim, model.mix_rate=0.3, "
                        "model.pca=-2, model.image_scales=[1,0.5], model.text_weight=0.7 (repeatable)")
    s.add_argument("--text", action="store_true", help="Versatile Diffusion: write sentences (image-to-text, text variation)")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("query", help="run SQL over the dataset's DuckDB views")
    s.add_argument("dir")
    s.add_argument("sql")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.add_argument("--max-rows", type=int, default=40)
    s.set_defaults(fn=cmd_query)

    s = sub.add_parser("stats", help="print the funnel: counts per stage and status")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_stats)

    s = sub.add_parser("verify", help="check every committed file against its completion record (size, sha256)")
    s.add_argument("dir")
    s.add_argument("--repair", action="store_true",
                   help="mark the shards with bad files not done, so the next run of their stage redoes them")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("clean-caption", help="clean captions with Versatile Diffusion's rules (appendix C.1)")
    s.add_argument("text", nargs="+")
    s.set_defaults(fn=cmd_clean_caption)

    s = sub.add_parser("demo", help="run the pipeline end to end on an embedded dataset (no network)")
    s.add_argument("--out", default="mmloom-demo")
    s.add_argument("--family", default="mumu", choices=list(FAMILIES), help="model family trained on the demo shards at the end")
    s.add_argument("--ray-address", default=None)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"mmloom {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; committed shards are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
