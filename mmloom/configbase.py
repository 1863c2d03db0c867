"""Shared config plumbing: strict pydantic sections and YAML loading whose errors name
the file and the dotted key. Used by the curation stages and by the trainer."""

from __future__ import annotations

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
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe(ann, f"{prefix}{name}.")
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((prefix + name, repr(default), field.description or ""))
    return rows
