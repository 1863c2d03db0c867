"""What a checkpoint holds: the tensors training changes, and the names of the frozen
pretrained parts it needs.

A *pretrained part* is the outermost submodule loaded through a library's
``from_pretrained`` (a diffusers ``ModelMixin`` whose config has ``_name_or_path``, or a
transformers ``PreTrainedModel`` with ``name_or_path``). Its frozen parameters and its
buffers are rebuilt from that source by the family's ``build``, so a checkpoint leaves
them out (the frozen autoencoder, vision tower and UNet base weights under LoRA) and
lists each part in ``frozen.json``: its prefix, where it came from, how many tensors were
left out, and a fingerprint (sum and absolute sum of those tensors) that loading checks,
so a rebuilt part that differs from the one trained against (another revision on the hub,
a family that changed the weights at build) stops the load instead of giving a silently
different model. Everything else, trainable or not, is kept: a frozen part that is not
pretrained (a random projection, dataset statistics) has no other source.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from mmloom.errors import UserError

FROZEN_FILE = "frozen.json"
WEIGHTS_FILE = "model.safetensors"


def pretrained_source(m: nn.Module) -> str | None:
    """Where ``m`` was loaded from, if it is a library model loaded by ``from_pretrained``."""
    cfg = getattr(m, "config", None)
    for src in (getattr(m, "name_or_path", None), getattr(cfg, "_name_or_path", None) if cfg is not None else None):
        if isinstance(src, str) and src:
            return src
    return None


def pretrained_parts(model: nn.Module) -> dict[str, str]:
    """{prefix ('unet.', 'ae.vae.', ...): source} of the outermost pretrained submodules."""
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if not name or any(name.startswith(p) for p in out):
            continue
        src = pretrained_source(m)
        if src is not None:
            out[name + "."] = src
    return out


def split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors to save, {prefix: {source, tensors, fingerprint}} of the frozen parts left out)."""
    parts = pretrained_parts(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    keep, left = {}, {p: [] for p in parts}
    for name, t in model.state_dict().items():
        prefix = next((p for p in parts if name.startswith(p)), None)
        if prefix is None or name in trainable:
            keep[name] = t
        else:
            left[prefix].append((name, t))
    frozen = {p: {"source": parts[p], "tensors": len(ts), "fingerprint": fingerprint(t for _n, t in ts)}
              for p, ts in left.items() if ts}
    return keep, frozen


def fingerprint(tensors) -> list[float]:
    s = a = 0.0
    for t in tensors:
        t = t.detach().double()
        s += t.sum().item()
        a += t.abs().sum().item()
    return [s, a]


def save_trained(model: nn.Module, path: str) -> None:
    """``model.safetensors`` (what training changes) and ``frozen.json`` into ``path``."""
    from safetensors.torch import save_file

    keep, frozen = split_state(model)
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in keep.items()}, os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, FROZEN_FILE + ".tmp"), "w") as f:
        json.dump({"parts": frozen}, f, indent=1)
    os.replace(os.path.join(path, FROZEN_FILE + ".tmp"), os.path.join(path, FROZEN_FILE))


def load_trained(model: nn.Module, path: str, built_from: str = "the run's train_config.yaml") -> None:
    """Load ``path``'s weights into ``model`` (built from the run's config): every tensor
    the model has must be in the file or in one of the frozen parts ``frozen.json`` names,
    with the same fingerprint. A checkpoint without ``frozen.json`` (written before this
    layout) holds the whole model."""
    from safetensors.torch import load_file

    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(weights):
        raise UserError(f"{path} has no {WEIGHTS_FILE}")
    sd = load_file(weights)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise UserError(f"{weights} does not match the model built from {built_from}: unexpected {unexpected[:3]}")
    fpath = os.path.join(path, FROZEN_FILE)
    if not os.path.exists(fpath):
        return  # an older checkpoint: the whole model (missing keys were never checked for those)
    try:
        with open(fpath) as f:
            frozen = {str(k): dict(v) for k, v in json.load(f)["parts"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{fpath}: not a valid list of frozen parts ({e})") from None
    covered = [k for k in missing if any(k.startswith(p) for p in frozen)]
    if len(covered) != len(missing):
        rest = [k for k in missing if k not in covered]
        raise UserError(f"{weights} lacks {len(rest)} tensor(s) of the model built from {built_from} "
                        f"that no frozen part covers, e.g. {rest[:3]}")
    state = model.state_dict()
    for prefix, info in frozen.items():
        names = [k for k in covered if k.startswith(prefix)]
        if len(names) != int(info.get("tensors", -1)):
            raise UserError(f"{fpath}: frozen part {prefix[:-1]} ({info.get('source')}) had {info.get('tensors')} "
                            f"tensors when saved; the model built from {built_from} has {len(names)} there")
        got = fingerprint(state[k] for k in names)
        want = [float(x) for x in info.get("fingerprint", [])]
        if len(want) != 2 or any(abs(g - w) > 1e-5 * max(1.0, abs(w)) for g, w in zip(got, want)):
            raise UserError(f"frozen part {prefix[:-1]} loaded from {info.get('source')} differs from the one this "
                            f"checkpoint was trained with (fingerprint {got} != {want} in {fpath}): another revision "
                            "of that model?")
