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

from mmloom.configbase import load_model
from .config import PipelineConfig, load_config
from ..manifests.store import ShardStore

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
    store = ShardStore(root)
    own = store.url(CONFIG_NAME)
    if config_path is None or os.path.abspath(config_path) == own:
        if store.exists(CONFIG_NAME):
            with store.open(CONFIG_NAME, mode="r") as f:
                data = yaml.safe_load(f) or {}
            data.pop(PROVENANCE, None)
            return load_model(PipelineConfig, None, overrides, data=data, source=own)
    return load_config(config_path, overrides)


def save_dataset_config(root: str, cfg: PipelineConfig) -> None:
    data = cfg.model_dump(mode="json")
    data[PROVENANCE] = {"versions": tool_versions()}
    text = "# written by mmloom: the settings this dataset was built with\n" + yaml.safe_dump(data, sort_keys=False)
    ShardStore(root).write_bytes(CONFIG_NAME, text.encode())
