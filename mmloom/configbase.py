"""Shared config plumbing: strict pydantic sections and YAML loading whose errors name
the file and the dotted key, and command-line flags that override config keys. Used by
the curation stages and by the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mmloom.errors import UserError

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    # validate_default: a default goes through its field's type like a loaded value does
    # (an int default of a float field becomes a float), so a saved config reloads equal
    # and its hash, which decides what a rerun redoes, does not change
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), validate_default=True)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def read_yaml(path: str | Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path}: top level must be a mapping of sections")
    return data


def load_model(cls: type[M], path: str | Path | None = None, overrides: dict[str, Any] | None = None,
               data: dict | None = None, source: str | None = None) -> M:
    """Validate YAML at ``path`` (or ``data``) as ``cls``, after ``overrides``
    ({"section.key": value}; None means "not given", so to switch a rule off pass the
    whole section: {"select": {"min_clip_score": None}})."""
    source = source or (str(path) if path is not None else "defaults")
    data = dict(data or {}) if path is None else read_yaml(path)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            _deep_merge(node[leaf], value)
        else:
            node[leaf] = value
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def describe(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) rows for README's config reference."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe(ann, f"{prefix}{name}.")
        else:
            default = f.get_default(call_default_factory=True)
            rows.append((prefix + name, repr(default), f.description or ""))
    return rows


@dataclass(frozen=True)
class Option:
    """One command-line flag: ``key`` is the config key it overrides (``download.image_size``;
    its help is that key's own description, so a flag and the YAML say the same thing), or,
    without a dot, a keyword of the command's function."""

    flags: tuple[str, ...]
    key: str
    kwargs: dict = field(default_factory=dict)


def key_description(model: type[BaseModel], dotted: str) -> str:
    """The description of ``dotted`` (``loop.steps``) in the config class ``model``."""
    *sections, name = dotted.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name].description or ""


def add_options(p, options: tuple[Option, ...], model: type[BaseModel]) -> None:
    """Add ``options`` to the argparse parser ``p``; not given, each is None."""
    for o in options:
        kw = dict(o.kwargs)
        if "." in o.key:
            kw.setdefault("help", f"{key_description(model, o.key)} (config: {o.key})")
            if kw.get("action") is None:
                kw.setdefault("metavar", o.key.rsplit(".", 1)[1].upper())
        p.add_argument(*o.flags, dest=o.key.replace(".", "__"), default=None, **kw)


def split_options(args, options: tuple[Option, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config overrides, function keywords) from parsed arguments; None = not given."""
    overrides, kwargs = {}, {}
    for o in options:
        v = getattr(args, o.key.replace(".", "__"))
        if "." in o.key:
            overrides[o.key] = v
        elif v is not None:
            kwargs[o.key] = v
    return overrides, kwargs
