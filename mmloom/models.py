"""The one path every model loads through: a hub id or a local directory/file.

The scorers (`filters/`), the grounding model and the trainers (`train/`) all import it
from here, below them.

References are strings:
  * a local directory or file path (absolute, relative or ~),
  * ``hf-hub:ORG/REPO`` or ``ORG/REPO`` for Hugging Face hub ids (read from the local
    cache; downloads only happen where the network allows them),
  * ``hf-hub:ORG/REPO/FILE`` for a single file in a hub repository,
  * for open_clip, ``ARCH/PRETRAINED`` such as ``ViT-B-32/openai`` (open_clip's own names).
A model that cannot be found is a `UserError` that names it and says how to supply it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
from pathlib import Path

from mmloom.errors import UserError

HOW_TO_SUPPLY = (
    "no weights can be fetched here: download them where the network allows "
    "(e.g. `huggingface-cli download ID --local-dir DIR`) and pass the local directory, "
    "or copy a Hugging Face cache into $HF_HOME"
)


def local_path(ref: str) -> Path | None:
    p = Path(os.path.expanduser(ref))
    return p if p.exists() else None


def missing(ref: str, what: str, err: Exception | None = None) -> UserError:
    detail = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err else ""
    return UserError(f"{what} {ref!r} is not available{detail}; {HOW_TO_SUPPLY}")


def fingerprint(ref: str) -> str:
    """A version string for a model: a content hash for local files, the id otherwise."""
    p = local_path(ref)
    if p is None:
        return ref
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        if f.stat().st_size > 0:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
            h.update(str(f.stat().st_size).encode())
    return f"sha256:{h.hexdigest()[:16]}"


def package_version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "unknown"


def resolve_file(ref: str, what: str, names: tuple[str, ...] = ()) -> str:
    """A weights file from a local file, a local directory holding one of ``names``, or
    ``hf-hub:ORG/REPO/FILE``."""
    p = local_path(ref)
    if p is not None:
        if p.is_file():
            return str(p)
        for n in names:
            if (p / n).is_file():
                return str(p / n)
        found = sorted(f for f in p.iterdir() if f.suffix in (".pt", ".pth", ".bin", ".safetensors"))
        if len(found) == 1:
            return str(found[0])
        raise UserError(f"{what} directory {ref} holds no single weights file (looked for {', '.join(names) or '*.pt|*.pth|*.bin|*.safetensors'})")
    hub = ref.removeprefix("hf-hub:")
    parts = hub.split("/")
    if len(parts) < 3:
        raise missing(ref, what)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    except Exception as e:
        raise missing(ref, what, e) from None


def load_state_dict(path: str) -> dict:
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # Lightning-style and DETR-style ({"model": ...}, Grounding DINO) checkpoints
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    return sd


def hf_pretrained(cls, ref: str, what: str, strict: bool = False, **kwargs):
    """``cls.from_pretrained`` on a local directory or a hub id, with a clear error.
    ``strict``: the weights must fit the model exactly (from_pretrained only warns about a
    missing, renamed or reshaped key and leaves that weight random: a silent error)."""
    p = local_path(ref)
    try:
        out = cls.from_pretrained(str(p) if p else ref.removeprefix("hf-hub:"), **kwargs,
                                  **({"output_loading_info": True} if strict else {}))
    except OSError as e:
        raise missing(ref, what, e) from None
    if not strict:
        return out
    model, info = out
    bad = [f"{kind.split('_')[0]} {', '.join(map(str, keys[:3]))}{' ...' if len(keys) > 3 else ''}"
           for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if (keys := info.get(kind))]
    if bad:
        sub = f" ({kwargs['subfolder']})" if kwargs.get("subfolder") else ""
        raise UserError(f"{what} {ref!r}{sub}: the weights do not fit the model's config: " + "; ".join(bad))
    return model


def inference_autocast(device: str):
    """The context a loaded model runs inference in on ``device``: bfloat16 autocast on a
    CUDA device (``cuda`` or ``cuda:N``, its type read by ``torch.device``), none elsewhere."""
    import torch

    kind = torch.device(device).type
    return torch.autocast(kind, enabled=kind == "cuda", dtype=torch.bfloat16)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)
