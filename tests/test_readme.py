"""README is the reference for every config knob: keep it in step with the code."""

from pathlib import Path

from mmloom.curate.config import PipelineConfig, describe
from mmloom.train.config import TrainConfig
from mmloom.train.families import FAMILIES, get_family
from mmloom.train.families.base import describe_config


def _rows():
    rows = describe(PipelineConfig) + describe(TrainConfig)
    for name in FAMILIES:  # every registered family's keys, with that family's defaults
        rows += describe_config(get_family(name).Config(), "model.")
    return rows


def test_readme_documents_every_config_key():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    keys = [k for k, _d, _ in _rows() if k != "model"]
    missing = [key for key in keys if f"`{key}`" not in readme]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_every_config_field_has_a_description():
    rows = _rows()
    assert [k for k, _d, desc in rows if not desc] == []


def test_threat_model_cites_tests_that_exist():
    """Every `file.py::test_name` in README's threat model names a test that is there."""
    import re

    root = Path(__file__).parent
    readme = (root.parent / "README.md").read_text()
    section = readme.split("## Threat model", 1)[1].split("\n## ", 1)[0]
    cited, current = [], None
    for m in re.finditer(r"`(?:(test_[a-z_]+\.py))?::(test_\w+)`", section):
        current = m.group(1) or current
        cited.append((current, m.group(2)))
    assert len(cited) >= 20
    for file, name in cited:
        assert re.search(rf"^def {name}\(", (root / "hostile" / file).read_text(), re.M), f"{file}::{name} is not a test"


def test_every_reference_in_the_code_resolves_from_a_clone():
    """The code cites ARCHITECTURE.md's principles and habits and files of the repository:
    each must be there (no document outside the repository)."""
    import re

    repo = Path(__file__).parent.parent
    arch = (repo / "ARCHITECTURE.md").read_text()
    principles = set(re.findall(r"^(\d+)\. \*\*", arch.split("## Principles", 1)[1].split("## Habits")[0], re.M))
    habits = set(re.findall(r"^(\d+)\. ", arch.split("## Habits", 1)[1].split("## Where")[0], re.M))
    bad = []
    for f in repo.rglob("*.py"):
        if ".venv" in f.parts or f.name == "test_readme.py":
            continue
        text = f.read_text()
        bad += [f"{f.name}: principle {n}" for n in re.findall(r"principle (\d+)", text) if n not in principles]
        bad += [f"{f.name}: habit {n}" for n in re.findall(r"habit (\d+)", text) if n not in habits]
        bad += [f"{f.name}: {m}" for m in re.findall(r"\b([A-Za-z_-]+\.md)\b", text)
                if not any(repo.rglob(m))]
    assert not bad, bad
