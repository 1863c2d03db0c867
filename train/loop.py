"""The training loop: a plain function, so `accelerate launch` and Ray Train run it as is.

accelerate provides one process, DDP or FSDP from the same code, bf16, gradient
accumulation; checkpoints are accelerate's own state (weights including LoRA, optimizer,
LR schedule, RNG states) plus the data position, so a killed run resumes on the same loss
curve. Logs go to TensorBoard (W&B optional) and to metrics.jsonl. The family supplies the
model and its parameter groups; nothing here knows about MUMU. No Ray, no DuckDB.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch
import yaml

from mmloom.train.config import TrainConfig


class DataState:
    """Raw samples consumed so far: a checkpointed, stateful part."""

    def __init__(self):
        self.consumed = 0

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, d):
        self.consumed = int(d["consumed"])


def latest_checkpoint(out: str) -> str | None:
    d = os.path.join(out, "checkpoints")
    if not os.path.isdir(d):
        return None
    done = sorted(c for c in os.listdir(d) if c.startswith("step_") and os.path.exists(os.path.join(d, c, "DONE")))
    return os.path.join(d, done[-1]) if done else None


def train(cfg: TrainConfig, echo=print, on_checkpoint=None) -> dict:
    """Train ``cfg``; resumes from the latest checkpoint in ``cfg.loop.out``.

    ``on_checkpoint(path, step, metrics)`` is called on every process after each
    checkpoint is complete (Ray Train reports it; plain runs pass nothing)."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, ProjectConfiguration, set_seed
    from diffusers.optimization import get_constant_schedule_with_warmup

    from mmloom.train.data import make_loader
    from mmloom.train.families import get_family
    from mmloom.train.flops import flops_per_sample, peak_flops
    from mmloom.train.prompts import PromptBuilder

    L = cfg.loop
    os.makedirs(L.out, exist_ok=True)
    trackers = (["tensorboard"] if L.tensorboard else []) + (["wandb"] if L.wandb else [])
    acc = Accelerator(
        mixed_precision=L.mixed_precision, gradient_accumulation_steps=L.grad_accum, log_with=trackers or None,
        cpu=not torch.cuda.is_available(),  # so several CPU processes (gloo) are one job, not copies
        project_config=ProjectConfiguration(project_dir=L.out, logging_dir=os.path.join(L.out, "tensorboard")),
        fsdp_plugin=FullyShardedDataParallelPlugin() if L.distributed == "fsdp" else None,
    )
    set_seed(L.seed)
    family = get_family(cfg.family)
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
        acc.register_for_checkpointing(ema)
    acc.register_for_checkpointing(data_state)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    if acc.is_main_process:
        with open(os.path.join(L.out, "train_config.yaml"), "w") as f:
            yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
        acc.init_trackers("mmloom", config={"family": cfg.family, "steps": L.steps})

    step = 0
    ckpt = latest_checkpoint(L.out) if L.resume else None
    if ckpt:
        acc.load_state(ckpt)
        step = int(os.path.basename(ckpt).split("_")[1])
        echo(f"resumed from {ckpt} (step {step}, {data_state.consumed} samples consumed)")
        if acc.is_main_process:
            with open(os.path.join(L.out, "resumes.log"), "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} resumed at step {step} from {ckpt}\n")

    builder = PromptBuilder(cfg.prompt)
    seed = L.seed + 1000 * acc.process_index
    loader, dataset = make_loader(cfg.data, builder, L.batch_size, seed, skip=data_state.consumed)
    unwrapped = acc.unwrap_model(model)
    flops = None
    peak = peak_flops(acc.device, L.peak_tflops)
    metrics_path = os.path.join(L.out, "metrics.jsonl")
    history = []
    t0, seen0 = time.perf_counter(), 0
    model.train()
    it = iter(loader)
    while step < L.steps:
        batch = next(it)
        if flops is None:
            flops = flops_per_sample(unwrapped, batch)
        with acc.accumulate(model):
            losses = model(batch)
            acc.backward(losses["loss"])
            if acc.sync_gradients and L.max_grad_norm:
                acc.clip_grad_norm_(model.parameters(), L.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        data_state.consumed = batch["last_index"] + 1
        seen0 += len(batch["prompts"]) * acc.num_processes
        if not acc.sync_gradients:
            continue
        step += 1
        if ema is not None:
            ema.step([p for g in optimizer.param_groups for p in g["params"]])
        loss = acc.gather(losses["loss"].detach()).mean().item()
        if step % L.log_every == 0 or step == L.steps:
            dt = time.perf_counter() - t0
            ips = seen0 / dt if dt > 0 else 0.0
            rec = {"step": step, "loss": loss, "images_per_s": ips,
                   **{f"lr/{n}": g["lr"] for n, g in zip(names, optimizer.param_groups)},
                   "data/corrupt_samples": dataset.corrupt.count}
            if flops and peak:
                rec["mfu"] = flops * ips / (peak * acc.num_processes)
            acc.log(rec, step=step)
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            history.append(rec)
            t0, seen0 = time.perf_counter(), 0
        if step % L.checkpoint_every == 0 or step == L.steps:
            path = save_checkpoint(acc, L.out, step, L.keep_checkpoints)
            if on_checkpoint is not None:
                on_checkpoint(path, step, {"step": step, "loss": loss})
    acc.end_training()
    return {"steps": step, "history": history, "flops_per_sample": flops, "out": L.out}


def save_checkpoint(acc, out: str, step: int, keep: int) -> str:
    path = os.path.join(out, "checkpoints", f"step_{step:08d}")
    acc.save_state(path)
    acc.wait_for_everyone()
    if acc.is_main_process:
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
