"""The folders import each other in one direction only, read from the source tree (ast),
lazy imports inside functions and relative imports included:

    mmloom/cli.py -> curate/ -> filters/ -> mmloom/models.py, mmloom/clip.py
                     train/ ---------------^      manifests/, mmloom/errors.py ...

filters/ holds scorers and detectors and never imports the stages (curate/); train/
imports neither the stages nor the scorers; the model hub and manifests/ import none of
them. A cycle between folders is what this keeps out.
"""

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ABOVE = ("mmloom.curate", "mmloom.filters", "mmloom.train", "mmloom.testkit")
FORBIDDEN = {  # source folder or file -> packages it must not import
    # (testkit/, the test and demo doubles, only for the demo and train's ``tiny:`` specs)
    "filters": ("mmloom.curate", "mmloom.train", "mmloom.testkit"),
    "train": ("mmloom.curate", "mmloom.filters"),
    "manifests": ABOVE,
    "mmloom/models.py": ABOVE,
    "mmloom/clip.py": ABOVE,
}


def packages() -> dict[str, str]:
    """Source folder -> installed package name, from pyproject's setuptools package-dir."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {folder: pkg for pkg, folder in cfg.items()}


def module_package(path: Path) -> str:
    """The installed package a source file belongs to (mmloom.train.families, ...)."""
    folder = path.parent.relative_to(ROOT).as_posix()
    return packages()[folder]


def imported(source: str, package: str) -> set[str]:
    """Every module name ``source`` (a module of ``package``) imports, relative ones
    resolved, including ``from PKG import sub`` as ``PKG.sub``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def violations(path: Path, forbidden: tuple[str, ...], source: str | None = None) -> list[str]:
    source = path.read_text() if source is None else source
    return sorted(m for m in imported(source, module_package(path))
                  if any(m == f or m.startswith(f + ".") for f in forbidden))


def sources(key: str) -> list[Path]:
    p = ROOT / key
    return [p] if p.suffix == ".py" else sorted(p.rglob("*.py"))


@pytest.mark.parametrize("key", list(FORBIDDEN))
def test_no_folder_imports_upwards(key):
    files = sources(key)
    assert files, f"{key} has no module: update FORBIDDEN"
    bad = {f.relative_to(ROOT).as_posix(): v for f in files if (v := violations(f, FORBIDDEN[key]))}
    assert not bad, f"imports against the layering: {bad}"


@pytest.mark.parametrize("line", [
    "from mmloom.curate.config import ScoreConfig",
    "import mmloom.curate.captions",
    "from mmloom import curate",
    "from ..curate import captions",
    "from ..curate.config import ScoreConfig",
    "def f():\n    from mmloom.curate.config import ScoreConfig\n",
])
def test_the_check_sees_every_form_of_import(line):
    """The scanner is not blind: each way of writing an upward import is caught."""
    path = ROOT / "filters" / "scoring.py"
    assert violations(path, FORBIDDEN["filters"], line) != []
    assert violations(path, FORBIDDEN["filters"], "from .base import Batch\nfrom ..models import fingerprint\n") == []
    nested = ROOT / "train" / "families" / "kandinsky.py"
    assert violations(nested, FORBIDDEN["train"], "from ...filters.clip_score import ClipScore") != []
    assert violations(nested, FORBIDDEN["train"], "from ...clip import ClipEmbedder\nfrom ..loop import train") == []


def test_imports_between_the_folders_resolve_from_the_tree():
    """Between curate/, filters/, manifests/, train/, ray_jobs/ and testkit/ imports are
    relative (``from ..manifests.store import ShardStore``): they resolve the same on disk
    and installed, so an editor, grep or a structure drawing follows them from a clone.
    (``mmloom.errors`` and the other modules of mmloom/ resolve on disk as they are.)"""
    subs = ("curate", "filters", "manifests", "train", "ray_jobs", "testkit")
    bad = []
    for folder in subs:
        for f in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                bad += [f"{f.relative_to(ROOT)}: {n}" for n in names if any(n == f"mmloom.{s}" or n.startswith(f"mmloom.{s}.") for s in subs)]
    assert not bad, bad
