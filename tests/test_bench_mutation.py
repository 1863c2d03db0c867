"""bench/mutation_skip_annotations.py skips exactly the mutants Python can never run:
those inside function signatures' annotations in a module that postpones them."""

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _module():
    spec = importlib.util.spec_from_file_location("skip_annotations", os.path.join(HERE, "..", "bench", "mutation_skip_annotations.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SOURCE = '''from __future__ import annotations
from pydantic import BaseModel


class Cfg(BaseModel):
    steps: int | None = None


def f(x: int | None = None, *rest: str | bytes, k: float | None = 1.0, **kw: dict | None) -> list | None:
    return x | 1
'''


def test_only_function_signature_annotations_of_postponed_modules_are_skipped():
    m = _module()
    spans = m.annotation_spans(SOURCE)
    lines = SOURCE.splitlines()
    texts = sorted(lines[s[0] - 1][s[1]:e[1]] for s, e in spans)
    assert texts == sorted(["int | None", "str | bytes", "float | None", "dict | None", "list | None"])
    row = 9  # the def line (1-based)
    col = lines[row - 1].index("int | None") + 4  # the `|` of x's annotation
    assert m.inside((row, col), (row, col + 1), spans)
    body = lines[row].index("|")  # `x | 1` in the body runs
    assert not m.inside((row + 1, body), (row + 1, body + 1), spans)
    field = lines[5].index("|")  # pydantic evaluates a field's annotation
    assert not m.inside((6, field), (6, field + 1), spans)
    assert m.annotation_spans(SOURCE.replace("from __future__ import annotations\n", "")) == []
