"""The training loop: a plain function, so `accelerate launch` and Ray Train run it as is.

accelerate provides one process, DDP or FSDP from the same code, bf16, gradient
accumulation; checkpoints are accelerate's own state (weights including LoRA, optimizer,
LR schedule, RNG states) plus the data position, so a killed run resumes on the same loss
curve. Logs go to TensorBoard (W&B optional) and to metrics.jsonl. The family supplies the
model and its parameter groups; nothing here knows about MUMU. No Ray, no DuckDB.

A checkpoint folder is data a resume loads, so it loads only what mmloom wrote: after
accelerate's ``save_state`` mmloom writes its own state (data position, EMA) as JSON and
safetensors, never pickles, and a manifest (``mmloom_checkpoint.json``: sha256 of every
file). Before ``load_state`` every file must be in the manifest with the same sha256,
and every torch file must pass ``torch.load(weights_only=True)``; otherwise the resume
stops with a UserError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from contextlib import contextmanager

import torch
import yaml

from mmloom.errors import UserError
from .config import TrainConfig

CHECKPOINT_MANIFEST = "mmloom_checkpoint.json"
# markers written beside the state (DONE last; Ray Train's step name and metadata), never loaded as state
NOT_STATE = {"DONE", CHECKPOINT_MANIFEST, "MMLOOM_STEP", ".metadata.json"}


class DataState:
    """Raw samples consumed so far: a checkpointed, stateful part."""

    def __init__(self):
        self.consumed = 0

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, d):
        self.consumed = int(d["consumed"])


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(ckpt: str) -> list[str]:
    """Every entry under ``ckpt`` (relative paths); anything but a regular file is refused."""
    out = []
    for d, dirs, names in os.walk(ckpt):
        for n in dirs + names:
            p = os.path.join(d, n)
            if os.path.islink(p) or not (os.path.isdir(p) or os.path.isfile(p)):
                raise UserError(f"{p}: not a regular file (a link?); mmloom does not resume from {ckpt}")
            if os.path.isfile(p):
                out.append(os.path.relpath(p, ckpt))
    return sorted(out)


def write_manifest(ckpt: str) -> None:
    files = {rel: {"bytes": os.path.getsize(os.path.join(ckpt, rel)), "sha256": _sha256(os.path.join(ckpt, rel))}
             for rel in _files(ckpt) if rel not in NOT_STATE}
    tmp = os.path.join(ckpt, CHECKPOINT_MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(ckpt, CHECKPOINT_MANIFEST))


def verify_checkpoint(ckpt: str, only: list[str] | None = None) -> None:
    """Refuse (UserError naming the file) a checkpoint holding anything mmloom did not
    write: a file missing from its manifest, or one whose sha256 differs. Then every torch
    file (all but safetensors and JSON) must load with ``weights_only=True``, which runs no
    code; accelerate loads them the same way. ``only``: check just these files (sampling)."""
    mpath = os.path.join(ckpt, CHECKPOINT_MANIFEST)
    if not os.path.isfile(mpath):
        raise UserError(f"{ckpt} has no {CHECKPOINT_MANIFEST}: not a checkpoint this mmloom wrote and sealed; "
                        "move it away (or set loop.resume: false) to start afresh")
    try:
        with open(mpath) as f:
            files = json.load(f)["files"]
        files = {str(rel): (int(m["bytes"]), str(m["sha256"])) for rel, m in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{mpath}: not a valid checkpoint manifest ({e})") from None
    if only is None:
        for rel in _files(ckpt):
            if rel not in files and rel not in NOT_STATE:
                raise UserError(f"{os.path.join(ckpt, rel)} is not listed in {mpath}: not written by mmloom; "
                                f"refusing to resume from {ckpt}")
    names = sorted(files) if only is None else only
    for rel in names:
        if rel not in files:
            raise UserError(f"{os.path.join(ckpt, rel)} is not listed in {mpath}: not written by mmloom")
        p = os.path.normpath(os.path.join(ckpt, rel))
        if os.path.isabs(rel) or not p.startswith(os.path.normpath(ckpt) + os.sep):
            raise UserError(f"{mpath}: entry {rel!r} points outside {ckpt}")
        size, digest = files[rel]
        if not os.path.isfile(p) or os.path.islink(p):
            raise UserError(f"{p} is listed in {mpath} but missing")
        if os.path.getsize(p) != size or _sha256(p) != digest:
            raise UserError(f"{p} does not match its sha256 in {mpath}: the checkpoint changed after mmloom wrote it")
    for rel in names:
        if not rel.endswith((".safetensors", ".json")):
            _weights_only(os.path.join(ckpt, rel))


def _weights_only(path: str) -> None:
    """torch.load(weights_only=True) with the numpy allowlist accelerate uses for its RNG
    states; memory-mapped, so a large optimizer state is not read twice."""
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS
    except ImportError:  # an accelerate without it loads RNG states without numpy globals
        TORCH_SAFE_GLOBALS = []
    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - whatever the unpickler says, the file is refused
        raise UserError(f"{path}: refused by the weights-only loader ({_reason(e)}); mmloom loads checkpoint state "
                        "with torch.load(weights_only=True) only") from None


def _reason(e: Exception) -> str:
    """The line of torch's weights-only error that says what was refused (not its advice
    to retry with weights_only=False)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        lines = [ln for ln in lines[1:] if not ln.startswith(("Check the documentation", "Please file an issue"))]
    return lines[0] if lines else type(e).__name__


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


EMA_SCALARS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


def save_own_state(acc, path: str, data_state: DataState, ema) -> None:
    """mmloom's state beside accelerate's, as JSON and safetensors (no pickles): the data
    position of each process, and the EMA weights (main process)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    _write_json(os.path.join(path, f"data_state_{acc.process_index}.json"), data_state.state_dict())
    if ema is not None and acc.is_main_process:
        sd = ema.state_dict()
        save_file({f"shadow.{i}": t.detach().cpu().contiguous().clone() for i, t in enumerate(sd["shadow_params"])},
                  os.path.join(path, "ema.safetensors"))
        _write_json(os.path.join(path, "ema.json"), {k: sd[k] for k in EMA_SCALARS})


def load_own_state(acc, path: str, data_state: DataState, ema) -> None:
    from safetensors.torch import load_file

    own = os.path.join(path, f"data_state_{acc.process_index}.json")
    p = own if os.path.exists(own) else os.path.join(path, "data_state_0.json")  # fewer processes than before
    try:
        with open(p) as f:
            data_state.load_state_dict(json.load(f))
        if data_state.consumed < 0:
            raise ValueError("negative position")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p}: not a valid data position ({e})") from None
    if ema is not None:
        p = os.path.join(path, "ema.safetensors")
        try:
            with open(os.path.join(path, "ema.json")) as f:
                sd = {k: v for k, v in json.load(f).items() if k in EMA_SCALARS}
            shadow = load_file(p)
            sd["shadow_params"] = [shadow[f"shadow.{i}"] for i in range(len(shadow))]
            if len(sd["shadow_params"]) != len(ema.shadow_params):
                raise ValueError(f"{len(shadow)} EMA tensors, the model has {len(ema.shadow_params)}")
            ema.load_state_dict(sd)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{p}: EMA state does not fit this run ({e})") from None


def latest_checkpoint(out: str) -> str | None:
    d = os.path.join(out, "checkpoints")
    if not os.path.isdir(d):
        return None
    done = sorted(c for c in os.listdir(d) if c.startswith("step_") and os.path.exists(os.path.join(d, c, "DONE")))
    return os.path.join(d, done[-1]) if done else None


def train(cfg: TrainConfig, echo=print, on_checkpoint=None, progress: bool = False) -> dict:
    """Train ``cfg``; resumes from the latest checkpoint in ``cfg.loop.out``.

    ``on_checkpoint(path, step, metrics)`` is called on every process after each
    checkpoint is complete (Ray Train reports it; plain runs pass nothing). ``progress``:
    a bar on the main process (loss, step time, samples/s) when stderr is a terminal.
    Returns the summary: mean throughput over the run's steps (not the last step's) and MFU."""
    from .data import make_loader, shard_urls
    from .families import get_family
    from .validation import Throughput, Validator, write_report

    L = cfg.loop
    # cheap checks first: shard specs, validation prompts, local model paths, before any
    # model (or diffusers, whose import alone takes seconds) loads
    urls = shard_urls(cfg.data.shards, cfg.data.allow_pipe)
    family = get_family(cfg.family)
    validator = Validator(cfg, family, echo)
    validator.check()
    check_local_paths(cfg.model)

    from accelerate.utils import set_seed
    from diffusers.optimization import get_constant_schedule_with_warmup
    from tqdm import tqdm

    from mmloom import progress_enabled
    from .flops import flops_per_sample, peak_flops
    from .prompts import PromptBuilder
    with _removed_if_the_start_fails(L.out):
        acc = _accelerator(L)
        set_seed(L.seed)
        model = family.build(cfg.model, cfg)
        groups = family.param_groups(model, cfg.model)
        names = [g.pop("name") for g in groups]
        optimizer = torch.optim.AdamW(groups, weight_decay=L.weight_decay)
        scheduler = get_constant_schedule_with_warmup(optimizer, L.warmup_steps)
        data_state = DataState()
        ema = None
        if L.ema_decay:
            from diffusers.training_utils import EMAModel

            ema = EMAModel([p for g in groups for p in g["params"]], decay=L.ema_decay)
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        _save_only_what_training_changes(acc)
        if acc.is_main_process:
            with open(os.path.join(L.out, "train_config.yaml"), "w") as f:
                yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
            acc.init_trackers("mmloom", config={"family": cfg.family, "steps": L.steps})

    step = 0
    ckpt = latest_checkpoint(L.out) if L.resume else None
    if ckpt:
        verify_checkpoint(ckpt)
        acc.load_state(ckpt, load_kwargs={"weights_only": True})
        load_own_state(acc, ckpt, data_state, ema)
        step = int(os.path.basename(ckpt).split("_")[1])
        echo(f"resumed from {ckpt} (step {step}, {data_state.consumed} samples consumed)")
        if acc.is_main_process:
            with open(os.path.join(L.out, "resumes.log"), "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} resumed at step {step} from {ckpt}\n")

    builder = PromptBuilder(cfg.prompt)
    seed = L.seed + 1000 * acc.process_index
    loader, dataset = make_loader(cfg.data, builder, L.batch_size, seed, skip=data_state.consumed, urls=urls)
    unwrapped = acc.unwrap_model(model)
    flops, counted = None, False  # None stays None when the count fails (no MFU, training goes on)
    peak = peak_flops(acc.device, L.peak_tflops)
    metrics_path = os.path.join(L.out, "metrics.jsonl")
    history = []
    first_step = step
    meter = Throughput()
    bar = tqdm(total=L.steps, initial=step, desc=f"train {cfg.family}", unit="step", leave=False,
               disable=not (acc.is_main_process and progress_enabled(progress)))
    model.train()
    it = iter(loader)
    while step < L.steps:
        batch = next(it)
        if not counted:
            flops, counted = flops_per_sample(unwrapped, batch), True
            meter.restart()  # the count is not training
        with acc.accumulate(model):
            losses = model(batch)
            acc.backward(losses["loss"])
            if acc.sync_gradients and L.max_grad_norm:
                acc.clip_grad_norm_(model.parameters(), L.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        data_state.consumed = batch["last_index"] + 1
        meter.add(len(batch["prompts"]) * acc.num_processes)
        if not acc.sync_gradients:
            continue
        step += 1
        if ema is not None:
            ema.step([p for g in optimizer.param_groups for p in g["params"]])
        loss = acc.gather(losses["loss"].detach()).mean().item()
        bar.set_postfix_str(f"loss {loss:.4f}, {meter.step():.2f} s/step, {meter.rate():.1f} samples/s", refresh=False)
        bar.update(1)
        if step % L.log_every == 0 or step == L.steps:
            ips, step_s = meter.interval()
            rec = {"step": step, "loss": loss, "images_per_s": ips, "step_time_s": step_s,
                   **{f"lr/{name}": g["lr"] for name, g in zip(names, optimizer.param_groups)},
                   "data/corrupt_samples": dataset.corrupt.count, "data/skipped_members": dataset.members.count}
            if flops and peak:
                rec["mfu"] = flops * ips / (peak * acc.num_processes)
            acc.log(rec, step=step)
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            history.append(rec)
        if step % L.checkpoint_every == 0 or step == L.steps:
            path = save_checkpoint(acc, L.out, step, L.keep_checkpoints, data_state, ema)
            if on_checkpoint is not None:
                on_checkpoint(path, step, {"step": step, "loss": loss})
        if validator.due(step) and acc.is_main_process:
            validator.run(unwrapped, step, L.out, acc.trackers)
        meter.restart()
    bar.close()
    acc.end_training()
    mean_ips, mean_step = meter.mean()
    summary = {"steps": step, "steps_this_run": step - first_step, "images_per_s_mean": mean_ips,
               "step_time_s_mean": mean_step, "flops_per_sample": flops,
               "mfu_mean": flops * mean_ips / (peak * acc.num_processes) if flops and peak and mean_ips else None,
               "last_loss": history[-1]["loss"] if history else None,
               "corrupt_samples": dataset.corrupt.count, "skipped_members": dataset.members.count}
    if acc.is_main_process:
        write_report(L.out, summary, f"{cfg.family}: training loss")
    return {**summary, "history": history, "out": L.out}


def check_local_paths(section, prefix: str = "model") -> None:
    """A model path written as a local path (/, ./, ../, ~) that does not exist stops the
    run before anything loads, naming its key (hub ids are left to the loader)."""
    from pydantic import BaseModel

    for name in type(section).model_fields:
        value, key = getattr(section, name), f"{prefix}.{name}"
        if isinstance(value, BaseModel):
            check_local_paths(value, key)
        elif (name == "path" or name.endswith("_checkpoint")) and isinstance(value, str) \
                and value.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(value)):
            raise UserError(f"{key} {value!r} does not exist")


def _accelerator(L):
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, ProjectConfiguration

    os.makedirs(L.out, exist_ok=True)
    trackers = (["tensorboard"] if L.tensorboard else []) + (["wandb"] if L.wandb else [])
    return Accelerator(
        mixed_precision=L.mixed_precision, gradient_accumulation_steps=L.grad_accum, log_with=trackers or None,
        cpu=not torch.cuda.is_available(),  # so several CPU processes (gloo) are one job, not copies
        project_config=ProjectConfiguration(project_dir=L.out, logging_dir=os.path.join(L.out, "tensorboard")),
        fsdp_plugin=FullyShardedDataParallelPlugin() if L.distributed == "fsdp" else None,
    )


@contextmanager
def _removed_if_the_start_fails(out: str):
    """A run that fails while starting (a model that does not load, a bad option) leaves
    no output directory behind when it made that directory."""
    existed = os.path.exists(out)
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _save_only_what_training_changes(acc) -> None:
    """accelerate writes the whole model; mmloom writes what training changes instead
    (``train/parts.py``: trainable tensors and buffers, plus ``frozen.json`` naming the
    frozen pretrained parts, which the family's ``build`` loads again). FSDP's sharded
    state passes no weights through these hooks and is saved by accelerate as before."""
    from .parts import load_trained, save_trained

    def save(models, weights, output_dir):
        if len(models) == 1 and len(weights) == 1:
            if acc.is_main_process:
                save_trained(acc.unwrap_model(models[0]), output_dir)
            weights.clear()

    def load(models, input_dir):
        if len(models) == 1:
            load_trained(acc.unwrap_model(models[0]), input_dir)
            models.clear()

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


def save_checkpoint(acc, out: str, step: int, keep: int, data_state: DataState | None = None, ema=None) -> str:
    path = os.path.join(out, "checkpoints", f"step_{step:08d}")
    acc.save_state(path)
    if data_state is not None:
        save_own_state(acc, path, data_state, ema)
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_manifest(path)  # sha256 of every file: a resume loads nothing else
        open(os.path.join(path, "DONE"), "w").close()  # a checkpoint without DONE is ignored
        ckpts = sorted(c for c in os.listdir(os.path.join(out, "checkpoints")) if c.startswith("step_"))
        for old in ckpts[:-keep]:
            shutil.rmtree(os.path.join(out, "checkpoints", old), ignore_errors=True)
    return path


def read_metrics(out: str) -> list[dict]:
    """metrics.jsonl, keeping the last record per step (a resumed run redoes some steps)."""
    by_step = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]
