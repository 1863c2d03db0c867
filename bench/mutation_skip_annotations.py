"""Mark as skipped the mutants of a cosmic-ray session that lie inside a function's
signature annotations (``def f(x: int | None = None) -> str | None``), in modules that
postpone annotations (``from __future__ import annotations``).

Why: Python never evaluates those annotations then, so ``int | None`` -> ``int / None``
cannot change behaviour; every one survives, and each costs a whole test run (in the
families' modules they were a fifth of the mutants). Only function signatures: a class
body's field annotations are evaluated by pydantic and dataclasses (a mutant there fails
at import), so those stay in. Usage: ``python bench/mutation_skip_annotations.py SESSION``
(bench/mutation.sh runs it unless ``MUTATION_KEEP_ANNOTATIONS=1``); prints the count.
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """((row, col), (end_row, end_col)) of every argument and return annotation of every
    function, rows 1-based as in cosmic-ray; none when annotations are evaluated."""
    tree = ast.parse(source)
    postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                    for n in tree.body)
    if not postponed:
        return []
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            args = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x is not None)]
            for ann in [x.annotation for x in args] + [node.returns]:
                if ann is not None:
                    spans.append(((ann.lineno, ann.col_offset), (ann.end_lineno, ann.end_col_offset)))
    return spans


def inside(start: tuple[int, int], end: tuple[int, int], spans) -> bool:
    return any(s <= start and end <= e for s, e in spans)


def main(session: str) -> int:
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    @lru_cache
    def spans(path: str):
        return annotation_spans(Path(path).read_text())

    skipped = 0
    with use_db(session) as db:
        done = {job for job, _ in db.results}
        for item in db.work_items:
            if item.job_id in done:
                continue
            if item.mutations and all(inside(tuple(m.start_pos), tuple(m.end_pos), spans(str(m.module_path)))
                                      for m in item.mutations):
                db.set_result(item.job_id, WorkResult(output="in a postponed annotation", worker_outcome=WorkerOutcome.SKIPPED))
                skipped += 1
    print(f"skipped {skipped} mutant(s) inside postponed function annotations")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
