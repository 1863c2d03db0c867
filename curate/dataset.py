"""The dataset directory's own config file, DIR/mmloom.yaml.

It records the settings every stage ran with and the tool versions. A command run on
DIR without ``--config`` reuses it, so later stages see the earlier stages' settings.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from typing import Any

import yaml

from mmloom.curate.config import PipelineConfig, load_config

CONFIG_NAME = "mmloom.yaml"
PROVENANCE = "_provenance"
TOOLS = ["mmloom", "ray", "img2dataset", "duckdb", "pyarrow", "webdataset", "torch", "open-clip-torch", "transformers", "diffusers", "nudenet"]


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for t in TOOLS:
        try:
            out[t] = md.version(t)
        except md.PackageNotFoundError:
            pass
    return out


def dataset_config(root: str, config_path: str | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """``--config`` if given, else DIR/mmloom.yaml if present, else defaults; then overrides."""
    path = config_path
    if path is None and os.path.exists(os.path.join(root, CONFIG_NAME)):
        path = os.path.join(root, CONFIG_NAME)
    if path is not None and os.path.abspath(path) == os.path.abspath(os.path.join(root, CONFIG_NAME)):
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        data.pop(PROVENANCE, None)
        tmp = os.path.join(root, f".{CONFIG_NAME}.read")
        with open(tmp, "w") as f:
            yaml.safe_dump(data, f)
        try:
            return load_config(tmp, overrides)
        finally:
            os.remove(tmp)
    return load_config(path, overrides)


def save_dataset_config(root: str, cfg: PipelineConfig) -> None:
    os.makedirs(root, exist_ok=True)
    data = cfg.model_dump(mode="json")
    data[PROVENANCE] = {"versions": tool_versions()}
    tmp = os.path.join(root, CONFIG_NAME + ".tmp")
    with open(tmp, "w") as f:
        f.write("# written by mmloom: the settings this dataset was built with\n")
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, os.path.join(root, CONFIG_NAME))
