"""The `mmloom` command: one subcommand per stage, plus query, stats and demo.

User mistakes (`UserError`) print one clear line and exit 2; a failed shard makes the
command exit 1 after its summary; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

from mmloom.configbase import Option
from mmloom.errors import UserError


def _ray_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start Ray in this process)")


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _common(p: argparse.ArgumentParser, ray: bool = True) -> None:
    p.add_argument("--config", help="pipeline YAML (default: DIR/mmloom.yaml if present, else built-in defaults)")
    if ray:
        _ray_flag(p)
    _progress_flag(p)


def cmd_stage(a) -> int:
    """Every stage command: load DIR's config with the flags as overrides, run the stage
    under the dataset's writer lock (not for a dry run), save the config, print the
    summary, list failed shards. One function for all: the stages differ only by their
    entry in curate/stages.py."""
    from mmloom.curate.dataset import dataset_config, save_dataset_config
    from mmloom.curate.stages import BY_NAME
    from mmloom.manifests.lock import writer_lock

    entry = BY_NAME[a.command]
    root = a.out if entry.sources else a.dir
    overrides, kwargs = entry.split_args(a)
    if entry.sources:  # cheap checks first: the inputs exist, before anything is created
        from mmloom.curate.ingest import expand_sources

        kwargs["sources"] = expand_sources(a.sources)
    else:
        _require_dataset(root)
    cfg = dataset_config(root, a.config, overrides)
    if kwargs.get("dry_run"):
        s = entry.run(root, cfg, None, not a.no_progress, **kwargs)
    else:
        with _removed_if_left_empty(root), writer_lock(root, a.command):
            s = entry.run(root, cfg, getattr(a, "ray_address", None), not a.no_progress, **kwargs)
            save_dataset_config(root, cfg)
    s["out"] = root
    for line in entry.lines(s):
        print(line)
    from mmloom.curate.run import report_failures

    return 1 if report_failures(s, "rerun to retry") else 0


def cmd_run(a) -> int:
    from mmloom.curate.run import run_pipeline

    return run_pipeline(a.pipeline, a.out, a.ray_address, not a.no_progress)


TRAIN_OPTIONS = (  # `mmloom train` flags: each overrides its config key
    Option(("--shards",), "data.shards"), Option(("--out",), "loop.out"), Option(("--steps",), "loop.steps", {"type": int}),
    Option(("--allow-pipe",), "data.allow_pipe", {"action": "store_true"}),
)


def cmd_train(a) -> int:
    from mmloom.configbase import load_model
    from mmloom.train.config import TrainConfig
    from mmloom.train.loop import train

    from mmloom.configbase import split_options

    overrides, _ = split_options(a, TRAIN_OPTIONS)
    cfg = load_model(TrainConfig, a.config, overrides)
    r = train(cfg, progress=not a.no_progress)
    print(train_summary(r))
    return 0


def train_summary(r: dict) -> str:
    """The line `mmloom train` ends with: mean throughput over the run's steps, MFU, where things are."""
    skipped = (f"; {r['corrupt_samples']} sample(s) skipped, {r['skipped_members']} unknown tar member(s) dropped unread"
               if r["corrupt_samples"] or r["skipped_members"] else "")
    loss = r["last_loss"] if r["last_loss"] is not None else float("nan")
    mfu = f", MFU {r['mfu_mean']:.1%}" if r.get("mfu_mean") else ""
    return (f"train: {r['steps']} steps in {r['out']}; last loss {loss:.4f}; mean {r['images_per_s_mean']:.2f} images/s, "
            f"{r['step_time_s_mean']:.2f} s/step over {r['steps_this_run']} steps{mfu}{skipped}; "
            f"loss.png, metrics.csv, summary.json there")


def cmd_sample(a) -> int:
    from mmloom.train.sample import parse_settings, sample

    out = a.out or ("samples.txt" if a.text else "samples.png")
    options = {"restore": True} if a.restore or a.mask else {}
    if a.mask:
        options["mask"] = a.mask
    out = sample(a.checkpoint, a.prompt, out, a.seeds, a.steps, a.guidance, a.size, theta=a.theta,
                 settings=parse_settings(a.set), text=a.text, options=options)
    if a.text:
        print(open(out).read(), end="")
    print(f"sample: {len(a.seeds)} {'sentence' if a.text else 'image'}(s) -> {out}")
    return 0


def cmd_export(a) -> int:
    from mmloom.train.export import export_run

    export_run(a.run, a.out, a.push_to_hub)
    return 0


@contextmanager
def _removed_if_left_empty(root: str):
    """A command that fails on a directory it created leaves nothing behind."""
    import os
    import shutil

    local = "://" not in root
    existed = not local or os.path.exists(root)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(root):
            files = [f for _d, _s, fs in os.walk(root) for f in fs]
            if not files:
                shutil.rmtree(root, ignore_errors=True)
        raise


def _require_dataset(root: str) -> None:
    from mmloom.manifests.store import ShardStore

    store = ShardStore(root)
    if not store.fs.isdir(store.base):
        raise UserError(f"no dataset directory {root}" + ("" if store.fs.exists(store.base) else ": the path does not exist"))


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


def cmd_browse(a) -> int:
    from mmloom.curate.browse import serve, write_site
    from mmloom.curate.dataset import dataset_config

    _require_dataset(a.dir)
    cfg = dataset_config(a.dir, None)
    s = write_site(a.dir, cfg.download.encode_format, not a.no_progress)
    print(f"browse: {s['samples']} samples ({s['selected']} selected, {s['rejected']} rejected) in {s['pages']} page(s); "
          f"open file://{s['index']}")
    if a.serve:
        def ready(httpd):
            print(f"browse: serving with search over the stored CLIP embeddings at http://127.0.0.1:{httpd.server_address[1]}/ "
                  "(Ctrl-C stops)", flush=True)

        serve(a.dir, a.port, cfg.score.clip.model, ready)
    return 0


def cmd_clean_caption(a) -> int:
    from mmloom.filters.captions import clean_caption

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


def cmd_toyworld(a) -> int:
    from mmloom.curate.toyworld import run_toyworld

    run_toyworld(a.out, a.seed, a.n, a.config, a.ray_address, not a.no_progress, clip=a.clip)
    return 0


def cmd_eval(a) -> int:
    from mmloom.train.eval import run_eval

    run_eval(a.run, a.shards, a.n, a.out, steps=a.steps, guidance=a.guidance, clip=a.clip, batch_size=a.batch_size,
             ablations=a.ablations, inception=a.inception)
    return 0


def _add_toyworld_and_eval(sub) -> None:
    s = sub.add_parser("toyworld", help="render a toy world of coloured shapes and curate it end to end (served from 127.0.0.1)")
    s.add_argument("--out", required=True, help="dataset directory")
    s.add_argument("--seed", type=int, default=0, help="scene seed (another seed: another, held-out world)")
    s.add_argument("--n", type=int, default=256, help="pictures rendered")
    s.add_argument("--config", default=None, help="pipeline YAML (default: configs/toyworld.yaml)")
    s.add_argument("--clip", default=None, metavar="MODEL",
                   help="the score stage's CLIP (a directory, ARCH/TAG or hf-hub:REPO with 32-d embeddings, as the toy "
                        "scoring heads; default: tiny random weights), whose embeddings the shards store: e.g. a toy CLIP "
                        "from mmloom.testkit.toyworld.make_toy_clip, for the families that condition on CLIP")
    s.add_argument("--ray-address", default=None)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_toyworld)
    _add_eval(sub)


def _add_eval(sub) -> None:
    s = sub.add_parser("eval", help="sample a trained run on held-out prompts and measure adherence next to shuffled and unconditional baselines")
    s.add_argument("run", help="a run directory or one of its checkpoints")
    s.add_argument("--shards", default=None, help="held-out dataset (default: the run's data.shards, which is not held out)")
    s.add_argument("--n", type=int, default=64, help="held-out prompts")
    s.add_argument("--out", default=None, help="output folder (default: RUN/eval)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default: the run's model.sampling)")
    s.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's model.sampling)")
    s.add_argument("--clip", default=None, help="real data: open_clip model for CLIP score (ARCH/TAG, hf-hub:REPO or a directory)")
    s.add_argument("--inception", default=None, metavar="FILE",
                   help="FID / KID: torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth; "
                        "default: torch hub's cache if a download left it there, else not computed)")
    s.add_argument("--batch-size", type=int, default=16, help="prompts sampled together")
    s.add_argument("--ablations", action="store_true",
                   help="toy world with crops (MUMU, M-VADER): also sample with crops only (names removed) and words only")
    s.set_defaults(fn=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    from mmloom.train.families import FAMILIES  # the registry's names (no family module is imported)

    p = argparse.ArgumentParser(prog="mmloom", description=__doc__.splitlines()[0])
    p.add_argument("--verbose", action="store_true",
                   help="show libraries' progress bars and warnings and Ray workers' logs (kept out of the terminal otherwise)")
    sub = p.add_subparsers(dest="command", required=True)

    from mmloom.curate.stages import STAGES

    for entry in STAGES:
        s = sub.add_parser(entry.name, help=entry.help)
        if entry.sources:
            s.add_argument("sources", nargs="+", help="parquet files, globs or directories")
            s.add_argument("--out", required=True, help="dataset directory")
        else:
            s.add_argument("dir")
        entry.add_arguments(s)
        _common(s, ray=entry.uses_ray)
        s.set_defaults(fn=cmd_stage)

    s = sub.add_parser("run", help="run every stage from one pipeline YAML, resuming where it stopped")
    s.add_argument("pipeline", help="pipeline YAML (see configs/laion.yaml, configs/coyo.yaml)")
    s.add_argument("--out", default=None, help="dataset directory (overrides run.out)")
    _ray_flag(s)
    _progress_flag(s)
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("train", help="train a model family on final/ shards (accelerate; `accelerate launch -m mmloom train` for DDP/FSDP)")
    s.add_argument("config", help="trainer YAML (see configs/train/)")
    from mmloom.configbase import add_options
    from mmloom.train.config import TrainConfig

    add_options(s, TRAIN_OPTIONS, TrainConfig)
    _progress_flag(s)
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
    s.add_argument("--restore", action="store_true",
                   help="MT-Diffusion masked_image: constrained restoration of the prompt's picture (its black pixels, "
                        "or --mask's white ones, are restored; every other pixel stays as given)")
    s.add_argument("--mask", default=None, help="with --restore: a picture whose white pixels are the ones to restore")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("export", help="write a run's trained parts in diffusers / peft formats with a model card")
    s.add_argument("run", help="a run directory or one of its checkpoints")
    s.add_argument("--out", default=None, help="output folder (default RUN/export; must be new or empty)")
    s.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="then upload the folder to this Hugging Face Hub repo (needs the network and a token)")
    s.set_defaults(fn=cmd_export)

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

    s = sub.add_parser("browse", help="write a static HTML browser of every selected and rejected sample to DIR/browse/")
    s.add_argument("dir")
    s.add_argument("--serve", action="store_true",
                   help="also serve it on 127.0.0.1 with similarity search over the stored CLIP embeddings (text search when the CLIP model loads)")
    s.add_argument("--port", type=int, default=8765, help="port for --serve (0: any free port)")
    _progress_flag(s)
    s.set_defaults(fn=cmd_browse)

    s = sub.add_parser("verify", help="check every committed file against its completion record (size, sha256)")
    s.add_argument("dir")
    s.add_argument("--repair", action="store_true",
                   help="mark the shards with bad files not done, so the next run of their stage redoes them")
    _progress_flag(s)
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("clean-caption", help="clean captions with Versatile Diffusion's rules (appendix C.1)")
    s.add_argument("text", nargs="+")
    s.set_defaults(fn=cmd_clean_caption)

    s = sub.add_parser("demo", help="run the pipeline end to end on an embedded dataset (no network)")
    s.add_argument("--out", default="mmloom-demo")
    s.add_argument("--family", default="mumu", choices=list(FAMILIES), help="model family trained on the demo shards at the end")
    _ray_flag(s)
    _progress_flag(s)
    s.set_defaults(fn=cmd_demo)
    _add_toyworld_and_eval(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        from mmloom import set_verbose

        set_verbose()
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
