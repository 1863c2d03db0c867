"""`mmloom sample CHECKPOINT --prompt "a <image:man.jpg> man and his <image:dog.jpg> dog"`:
rebuild the model from the run's train_config.yaml (with ``--set`` overrides of its
inference knobs), load the checkpoint's weights, sample each seed with the family's
sampling defaults (``model.sampling``: sampler, steps and guidance from its paper, e.g.
MUMU DDIM 50 steps, M-VADER PNDM 50 steps guidance 8) unless ``steps``/``guidance`` are
given, and save a PNG grid; or, for families with text outputs (Versatile Diffusion),
write one sentence per seed."""

from __future__ import annotations

import os

import torch
import yaml

from mmloom.errors import UserError
from .config import TrainConfig


def find_run(checkpoint: str) -> tuple[str, str]:
    """(run dir holding train_config.yaml, checkpoint dir). Accepts either."""
    from .loop import latest_checkpoint

    checkpoint = os.path.abspath(checkpoint)
    if not os.path.exists(checkpoint):
        raise UserError(f"{checkpoint} does not exist (a run directory or one of its checkpoints/step_N folders)")
    if os.path.exists(os.path.join(checkpoint, "train_config.yaml")):
        ck = latest_checkpoint(checkpoint)
        if ck is None:
            raise UserError(f"{checkpoint} holds no finished checkpoint")
        return checkpoint, ck
    run = os.path.dirname(os.path.dirname(checkpoint))
    if not os.path.exists(os.path.join(run, "train_config.yaml")):
        raise UserError(f"{checkpoint} is not a checkpoint of an mmloom run (no train_config.yaml two levels up)")
    return run, checkpoint


def parse_settings(items: list[str] | None) -> dict:
    """``["model.mix_rate=0.3", "model.sampling.guidance=7"]`` -> {dotted key: YAML value}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. model.mix_rate=0.3")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {item!r}: the value is not valid YAML ({e.problem})") from None
    return out


def load_for_sampling(checkpoint: str, settings: dict | None = None):
    """(family, model in eval mode, config) of a run's checkpoint; ``settings`` override
    the run's train_config.yaml (inference knobs such as model.mix_rate)."""
    from mmloom.configbase import load_model
    from .families import get_family
    from .loop import verify_checkpoint

    run, ck = find_run(checkpoint)
    path = os.path.join(run, "train_config.yaml")
    cfg = load_model(TrainConfig, path, settings, source=f"{path} with --set" if settings else path)
    family = get_family(cfg.family)
    model = family.build(cfg.model, cfg)  # cfg.model: the family's Config, validated on load
    from .parts import FROZEN_FILE, load_trained

    if not os.path.exists(os.path.join(ck, "model.safetensors")):
        raise UserError(f"{ck} has no model.safetensors")
    # the weights mmloom wrote, unchanged
    verify_checkpoint(ck, only=["model.safetensors"] + ([FROZEN_FILE] if os.path.exists(os.path.join(ck, FROZEN_FILE)) else []))
    load_trained(model, ck, f"{run}/train_config.yaml")
    return family, model.eval(), cfg


def grid(images, cols: int | None = None):
    from PIL import Image

    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


def sample(checkpoint: str, prompt: str, out: str, seeds: list[int], steps: int | None = None, guidance: float | None = None,
           size: int | None = None, base_dir: str = ".", theta: list[float] | None = None,
           settings: dict | None = None, text: bool = False, options: dict | None = None) -> str:
    """Sample ``seeds`` images into one grid at ``out``. ``steps``/``guidance`` None: the
    run's ``model.sampling`` (the family's defaults). ``theta`` (M-VADER): one value for
    every image segment, or one per prompt segment (attention manipulation). ``text``:
    sentences instead of images (image-to-text, text variation), one line per seed.
    ``options``: the family's own sampling arguments (MT-Diffusion's ``restore`` and
    ``mask``, a path read as a picture); a family without them refuses them by name."""
    from .prompts import parse_prompt, read_picture

    # the user's pictures first: a missing file is one line now, not after the model loads
    parts = parse_prompt(prompt, base_dir)
    extra = dict(options or {})
    if isinstance(extra.get("mask"), str):
        extra["mask"] = read_picture(extra["mask"], base_dir, "--mask picture")
    family, model, cfg = load_for_sampling(checkpoint, settings)
    if text:
        if not family.text_outputs:
            raise UserError(f"--text needs a family with text outputs; {cfg.family} makes pictures")
        with torch.no_grad():
            lines = family.generate_text(model, [parts] * len(seeds), steps, guidance, seeds)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.writelines(f"{seed}\t{line}\n" for seed, line in zip(seeds, lines))
        return out
    with torch.no_grad():
        if theta:
            if "theta" not in family.options:
                raise UserError(f"--theta: not a sampling option of a {cfg.family} run "
                                f"(its options: {', '.join(sorted(family.options)) or 'none'})")
            extra["theta"] = theta[0] if len(theta) == 1 else [theta] * len(seeds)
        images = family.generate(model, [parts] * len(seeds), steps, guidance, seeds, size or cfg.data.resolution, **extra)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    grid(images).save(out)
    return out
