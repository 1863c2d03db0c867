"""Every ```python block of README.md and of a dataset card runs (issue 19, item 7),
against a dataset the pipeline built (the session's `pipeline_run`, copied and named
mmloom-demo in a fresh working directory, as README's snippets expect)."""

import re
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]  # builds a dataset with the whole pipeline

README = Path(__file__).parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def run_blocks(blocks: list[str], where: str) -> None:
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{where} python block {i + 1}", "exec"), {"__name__": "__snippet__"})
        except Exception as e:  # noqa: BLE001 - name the block that failed
            raise AssertionError(f"{where} python block {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e


def test_readme_and_card_snippets_run(pipeline_run, tmp_path, monkeypatch):
    root = pipeline_run[0]
    shutil.copytree(root, tmp_path / "mmloom-demo", ignore=shutil.ignore_patterns("writer.lock"))
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4, "README's reader and API examples"
    run_blocks(blocks, "README.md")
    card = (tmp_path / "mmloom-demo" / "README.md").read_text()
    card_blocks = python_blocks(card)
    assert len(card_blocks) == 2 and "final/{" not in card  # no brace pattern that assumes a shard count
    run_blocks([b.replace(str(root), str(tmp_path / "mmloom-demo")) for b in card_blocks], "the dataset card")
    assert (tmp_path / "mmloom-demo" / "browse" / "index.html").exists()  # the API example wrote the browser
