"""Validation grids during training and the run's report files.

``Validator`` samples ``loop.validation``'s prompts (the user's own, and/or the first
prompts of held-out shards, built without augmentation) with fixed seeds through the
family's ``generate``, every N steps: a grid (a row per prompt, a column per seed) saved
as ``OUT/validation/step_N.png`` and logged to the trackers (TensorBoard, W&B) as an
image. Sampling runs under a forked RNG in eval mode, so the training run is the same
with validation on or off.

``write_report`` writes what a run leaves for people: ``metrics.csv`` (beside
``metrics.jsonl``), ``loss.png`` and ``summary.json`` (mean throughput and MFU).
"""

from __future__ import annotations

import csv
import json
import os
import time

import torch

from .config import TrainConfig


class Validator:
    def __init__(self, cfg: TrainConfig, family, echo=print):
        self.v, self.cfg, self.family, self.echo = cfg.loop.validation, cfg, family, echo
        self.prompts: list[list] | None = None

    def due(self, step: int) -> bool:
        return bool(self.v.every) and (step % self.v.every == 0 or step == self.cfg.loop.steps)

    def _load_prompts(self) -> list[list]:
        from .prompts import parse_prompt

        prompts = [parse_prompt(p) for p in self.v.prompts]
        if self.v.shards:
            prompts += held_out_prompts(self.cfg, self.v.shards, self.v.num_prompts)
        return prompts

    def check(self) -> None:
        """Cheap checks before the model loads: the prompts' images and the held-out shards exist."""
        from .data import shard_urls
        from .prompts import parse_prompt

        from mmloom.errors import UserError

        sampling = self.cfg.model.sampling
        for key in ("steps", "guidance"):
            if getattr(self.v, key) is not None and getattr(sampling, key) is None:
                raise UserError(f"loop.validation.{key}: {self.cfg.family} samples without it "
                                f"({sampling.summary()}); leave it null")
        for key, value in self.cfg.model:
            if key.endswith("_checkpoint") and value and not os.path.exists(value):  # sampling needs it (a Kandinsky prior run)
                raise UserError(f"model.{key} {value!r} does not exist: validation samples through it")
        for p in self.v.prompts:
            parse_prompt(p)
        if self.v.shards:
            shard_urls(self.v.shards, self.cfg.data.allow_pipe, "loop.validation.shards")

    def run(self, model, step: int, out: str, trackers) -> str | None:
        """Sample the grid for ``step``; None when the family's run makes no pictures."""
        from .sample import grid

        if not self.family.makes_pictures(model):
            return None
        if self.prompts is None:
            self.prompts = self._load_prompts()
        seeds = list(self.v.seeds)
        was_training = model.training
        model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                images = []
                for parts in self.prompts:  # one call per prompt: a row of seeds
                    images += self.family.generate(model, [parts] * len(seeds), self.v.steps, self.v.guidance, seeds,
                                                   self.v.size or self.cfg.data.resolution)
        finally:
            model.train(was_training)
        picture = grid(images, cols=len(seeds))
        path = os.path.join(out, "validation", f"step_{step:08d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        picture.save(path)
        log_image(trackers, "validation", picture, step)
        return path


def log_image(trackers, key: str, picture, step: int) -> None:
    import numpy as np

    arr = np.asarray(picture.convert("RGB"))
    for t in trackers:
        if t.name == "tensorboard":
            t.log_images({key: arr[None]}, step=step, dataformats="NHWC")
        elif t.name == "wandb":
            t.log_images({key: [arr]}, step=step)


def held_out_prompts(cfg: TrainConfig, shards: str, n: int) -> list[list]:
    """The first ``n`` prompts of ``shards`` in order, built by the training prompt rules
    without augmentation or sample weighting (so the same every time)."""
    from .data import make_loader, shard_urls
    from .prompts import PromptBuilder

    data = cfg.data.model_copy(update={"shards": shards, "resampled": False, "shuffle_buffer": 0, "num_workers": 0,
                                       "use_weights": False})
    builder = PromptBuilder(cfg.prompt.model_copy(update={"augment_prob": 0.0, "structure_prob": 0.0}))
    loader, _ds = make_loader(data, builder, n, cfg.loop.seed, urls=shard_urls(shards, data.allow_pipe, "loop.validation.shards"))
    with torch.random.fork_rng(devices=[]):
        batch = next(iter(loader), None)
    if batch is None:
        from mmloom.errors import UserError

        raise UserError(f"loop.validation.shards {shards!r} holds no sample")
    return [p.parts for p in batch["prompts"]]


class Throughput:
    """Samples per second from one optimizer step to the next, leaving out what is not
    training (the FLOP count, checkpoints, validation: call ``restart`` after them), per
    logging interval and over the whole run (the summary's mean, not the last step's)."""

    def __init__(self):
        self.busy = self.samples = self.steps = 0
        self.i_busy = self.i_samples = self.i_steps = 0
        self.restart()

    def restart(self) -> None:
        self.t = time.perf_counter()

    def add(self, n: int) -> None:
        self.samples += n
        self.i_samples += n

    def step(self) -> float:
        """Close an optimizer step; its seconds."""
        dt = time.perf_counter() - self.t
        self.busy += dt
        self.i_busy += dt
        self.steps += 1
        self.i_steps += 1
        return dt

    def rate(self) -> float:
        return self.i_samples / self.i_busy if self.i_busy > 0 else 0.0

    def interval(self) -> tuple[float, float]:
        """(samples/s, seconds per step) since the last call."""
        out = (self.rate(), self.i_busy / max(1, self.i_steps))
        self.i_busy = self.i_samples = self.i_steps = 0
        return out

    def mean(self) -> tuple[float, float]:
        return (self.samples / self.busy if self.busy > 0 else 0.0), self.busy / max(1, self.steps)


def write_report(out: str, summary: dict, title: str) -> None:
    """metrics.csv, loss.png and summary.json from the run's metrics.jsonl (main process)."""
    from .loop import read_metrics

    hist = read_metrics(out) if os.path.exists(os.path.join(out, "metrics.jsonl")) else []
    if hist:
        cols = list(dict.fromkeys(k for r in hist for k in r))
        with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, cols)
            w.writeheader()
            w.writerows(hist)
        plot_loss(hist, os.path.join(out, "loss.png"), title)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def plot_loss(hist: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], lw=1, label="loss")
    k = 5
    if len(hist) >= k:
        sm = [sum(h["loss"] for h in hist[i - k + 1:i + 1]) / k for i in range(k - 1, len(hist))]
        ax.plot([h["step"] for h in hist[k - 1:]], sm, lw=2, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
