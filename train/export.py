"""`mmloom export RUN [--out DIR] [--push-to-hub REPO]`: a run's trained parts in their
libraries' own formats, safetensors throughout, with a model card.

What the default ``Family.export`` writes (``export_parts``), for every library model in
the run (a diffusers ``ModelMixin`` or transformers ``PreTrainedModel``) that training
changed:

* a diffusers model with LoRA (MUMU's UNet): ``NAME/``, the model with the LoRA merged,
  loadable with ``from_pretrained`` (``UNet2DConditionModel.from_pretrained(DIR/"unet")``),
  and ``NAME_lora/``, the peft adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``, as peft's ``save_pretrained`` writes them);
* a transformers model with LoRA (MUMU's VLM): ``NAME_lora/``, the peft adapter for the
  public base model;
* a library model trained whole: ``NAME/`` through its own ``save_pretrained``;
* every other trained tensor (MUMU's adapter, M-VADER's new key/value projections,
  Versatile Diffusion's multi-flow layers, a Kandinsky prior, statistics):
  ``conditioning.safetensors`` with ``conditioning.json`` (their names and shapes, the
  family and its config), since no library has a format for them.

Frozen parts are not copied: the card names them (``base_model``) and ``frozen.json`` of
the checkpoint lists their sources.

Where diffusers has a pipeline for the family, the family's ``export`` writes a whole
pipeline directory instead (``save_pipeline``: ``model_index.json`` and one folder per
component, loadable with ``DiffusionPipeline.from_pretrained(OUT)``): Versatile Diffusion
(``VersatileDiffusionPipeline``), a Kandinsky decoder (``KandinskyPipeline``) and a
Kandinsky ``released`` prior (``KandinskyPriorPipeline``). A pipeline must be complete to
load, so its frozen parts are written too (the autoencoder, the text encoder; open_clip
encoders converted to transformers' CLIP by ``mmloom/clip_convert.py``); what no library
has a format for stays in ``conditioning.safetensors`` beside it (``export_parts(...,
exclude=...)``), and the family's ``export_notes`` go into the card.

``--push-to-hub`` uploads the folder with huggingface_hub (it needs the network and a
token).
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import torch
import yaml
from torch import nn

from mmloom.errors import UserError
from .parts import pretrained_parts


def _is_diffusers(m: nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, ModelMixin)


def _part_name(prefix: str) -> str:
    return prefix.rstrip(".").replace(".", "_")


def _lora_layers(m: nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [x for x in m.modules() if isinstance(x, LoraLayer)]


def save_adapter(module: nn.Module, path: str) -> None:
    """The peft adapter of ``module`` in peft's own layout (adapter_config.json, adapter_model.safetensors)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    for name, config in module.peft_config.items():
        d = path if name == "default" else os.path.join(path, name)
        os.makedirs(d, exist_ok=True)
        sd = get_peft_model_state_dict(module, adapter_name=name)
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, os.path.join(d, "adapter_model.safetensors"))
        config.save_pretrained(d)


def merged_diffusers(module: nn.Module) -> tuple[nn.Module | None, dict[str, torch.Tensor]]:
    """(a plain copy of diffusers ``module`` with its LoRA merged into the weights, the
    tensors the plain model has no place for: processors or projections a family added).
    (None, every tensor) when the family took layers out of it (Versatile Diffusion's
    per-flow pieces): no library loads such a model."""
    clone = copy.deepcopy(module)
    for layer in _lora_layers(clone):
        layer.merge()
    sd = {k.replace(".base_layer.", "."): v for k, v in clone.state_dict().items() if "lora_" not in k}
    plain = type(module).from_config(module.config)
    try:
        missing, unexpected = plain.load_state_dict(sd, strict=False)
    except RuntimeError:  # a tensor of another shape than the config says
        return None, sd
    if missing:
        return None, sd
    extra = {k: sd[k] for k in unexpected}
    return plain.eval(), extra


def export_parts(model: nn.Module, out: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """The default ``Family.export`` (see the module docstring); the paths written, relative
    to ``out``. ``exclude``: state-dict prefixes already written elsewhere (a pipeline
    directory), left out here."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    written: list[str] = []
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    covered: set[str] = {k for k in state if exclude and k.startswith(exclude)}
    extra: dict[str, torch.Tensor] = {}
    parts = {p: s for p, s in pretrained_parts(model).items() if not (exclude and p.startswith(exclude))}
    for prefix in parts:
        module = model.get_submodule(prefix.rstrip("."))
        mine = [k for k in state if k.startswith(prefix)]
        if not any(k in trainable for k in mine):
            covered.update(mine)  # frozen: named in the card, not copied
            continue
        name = _part_name(prefix)
        has_lora = bool(getattr(module, "peft_config", None)) and bool(_lora_layers(module))
        if has_lora:
            save_adapter(module, os.path.join(out, f"{name}_lora"))
            written.append(f"{name}_lora")
        if _is_diffusers(module):
            plain, leftover = merged_diffusers(module)  # added processors or projections: conditioning.safetensors
            if plain is not None:
                plain.save_pretrained(os.path.join(out, name), safe_serialization=True)
                written.append(name)
            extra.update({prefix + k: v for k, v in leftover.items()})
            covered.update(mine)
        elif has_lora:  # a transformers model: the adapter alone goes with the public base model
            covered.update(k for k in mine if k not in trainable or "lora_" in k)
        else:
            module.save_pretrained(os.path.join(out, name), safe_serialization=True)
            written.append(name)
            covered.update(mine)
    extra.update({k: v for k, v in state.items()
                  if k not in covered and (k in trainable or not k.startswith(tuple(parts)))})
    if extra:
        save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, os.path.join(out, "conditioning.safetensors"))
        written.append("conditioning.safetensors")
    return written


@torch.no_grad()
def save_pipeline(pipe, out: str) -> list[str]:
    """A diffusers pipeline directory in ``out`` (``model_index.json``, one folder per
    component, safetensors); the paths written, relative to ``out``."""
    import diffusers

    os.makedirs(out, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    index = os.path.join(out, "model_index.json")
    with open(index) as f:
        entries = json.load(f)
    for name, component in pipe.components.items():
        # a class that lives in a pipeline's own module (Versatile Diffusion's UNetFlatConditionModel) is
        # recorded as "diffusers", which has no such class: record its module, imported with the pipeline
        if entries.get(name, [None])[0] == "diffusers" and not hasattr(diffusers, type(component).__name__):
            entries[name] = [type(component).__module__, type(component).__name__]
    with open(index, "w") as f:
        json.dump(entries, f, indent=2, sort_keys=True)
    return ["model_index.json"] + sorted(k for k, v in pipe.components.items() if v is not None)


def export_run(run: str, out: str | None = None, push_to_hub: str | None = None, echo=print) -> str:
    """Export ``run`` (a run directory or checkpoint) into ``out`` (default RUN/export)."""
    from .sample import find_run, load_for_sampling

    run_dir, ck = find_run(run)
    out = os.path.abspath(out or os.path.join(run_dir, "export"))
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"{out} exists and is not empty: choose another --out or remove it")
    if push_to_hub:
        _check_hub_ready()
    family, model, cfg = load_for_sampling(ck)
    os.makedirs(out, exist_ok=True)
    try:
        written = family.export(model, out)
        with open(os.path.join(out, "conditioning.json"), "w") as f:
            json.dump({"family": cfg.family, "checkpoint": os.path.relpath(ck, run_dir), "parts": written,
                       "tensors": _shapes(os.path.join(out, "conditioning.safetensors")),
                       "frozen": _frozen(ck), "model": cfg.model.model_dump(mode="json")}, f, indent=1)
        grid = _last_validation_grid(run_dir)
        if grid:
            shutil.copyfile(grid, os.path.join(out, "validation.png"))
        model_card(cfg, family, written, bool(grid), run_dir, family.export_notes(model)).save(os.path.join(out, "README.md"))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    echo(f"export: {', '.join(written) or 'nothing trained'} -> {out}")
    if push_to_hub:
        echo(f"export: uploaded to {push(out, push_to_hub)}")
    return out


def _shapes(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def _frozen(ck: str) -> dict:
    p = os.path.join(ck, "frozen.json")
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        return {k: v.get("source") for k, v in json.load(f).get("parts", {}).items()}


def _last_validation_grid(run_dir: str) -> str | None:
    d = os.path.join(run_dir, "validation")
    pngs = sorted(f for f in os.listdir(d) if f.endswith(".png")) if os.path.isdir(d) else []
    return os.path.join(d, pngs[-1]) if pngs else None


def model_card(cfg, family, written: list[str], has_grid: bool, run_dir: str, notes: list[str] = ()):
    """huggingface_hub's ModelCard: base model, dataset card link, training config, validation grid."""
    from huggingface_hub import ModelCard, ModelCardData

    base = cfg.model.backbone.path
    hub_id = not (base.startswith("tiny:") or os.path.exists(base))
    data = ModelCardData(library_name="diffusers", base_model=base if hub_id else None,
                         tags=["mmloom", f"mmloom-{cfg.family}", "diffusers", "multimodal-conditioning"])
    shards = cfg.data.shards
    card = os.path.join(shards, "README.md")
    dataset = (f"[the dataset card]({card})" if os.path.isfile(card) else f"`{shards}`") if shards else "not recorded"
    parts = "\n".join(f"- `{w}`" for w in written) or "- (nothing trained)"
    text = "\n".join([
        "---", data.to_yaml(), "---", "",
        f"# {cfg.family} trained with mmloom", "",
        family.title + ".", "",
        f"Base model: `{base}`. Training data: {dataset}.", "",
        "## Files", "", parts,
        "- `conditioning.json`: what each file holds, the frozen parts it needs and the model config", "",
        *(["## Notes", "", *(f"- {n}" for n in notes), ""] if notes else []),
        *(["## Validation", "", "![validation grid](validation.png)", ""] if has_grid else []),
        "## Training configuration", "", "```yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).strip(), "```", "",
    ])
    return ModelCard(text)


def _check_hub_ready() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise UserError("--push-to-hub needs the network: Hugging Face Hub access is switched off here (HF_HUB_OFFLINE); "
                        "export without it, then upload the folder where the network is reachable")


def push(out: str, repo: str) -> str:
    """Upload ``out`` to the Hub repo ``repo`` (created if needed); needs the network and a token."""
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo, exist_ok=True)
        info = upload_folder(repo_id=repo, folder_path=out, commit_message="mmloom export")
    except Exception as e:  # noqa: BLE001 - offline, no token, no rights: one line, the export stays on disk
        raise UserError(f"--push-to-hub {repo}: the upload needs the network and a Hugging Face token "
                        f"(`hf auth login`); it failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"the export is in {out}") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}"
