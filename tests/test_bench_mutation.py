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


def test_fork_server_stops_a_run_at_its_deadline_and_says_so(tmp_path):
    """bench/forkserver.py: a run past the deadline in SOCKET.deadline is stopped, answered
    124 (not pytest's 1, so a slow survivor is not counted as an ordinary kill) and logged
    in SOCKET.timeouts.log; the client says so on its stdout, which cosmic-ray keeps with the
    mutant (so the report names which mutants were stopped); a run within it answers
    pytest's own status. The deadline is read per run (bench/mutation.sh writes it once the
    unmutated run is timed)."""
    import subprocess
    import sys
    import time

    server_py = os.path.join(HERE, "..", "bench", "forkserver.py")
    flag, sock = tmp_path / "sleep", str(tmp_path / "s.sock")
    (tmp_path / "test_slow.py").write_text(
        "import os, time\n"
        f"def test_slow():\n    if os.path.exists({str(flag)!r}):\n        time.sleep(float(open({str(flag)!r}).read()))\n")
    args = ["-q", "-p", "no:cacheprovider", str(tmp_path / "test_slow.py")]
    server = subprocess.Popen([sys.executable, server_py, sock, "--", *args], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    said = []

    def run(*extra):
        done = subprocess.run([sys.executable, server_py, "--run", sock, *extra], capture_output=True, text=True)
        said.append(done.stdout)
        return done.returncode

    try:
        for _ in range(600):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        assert run(*args) == 0
        (tmp_path / "s.sock.deadline").write_text("1")
        flag.write_text("30")
        start = time.monotonic()
        assert run(*args) == 124 and time.monotonic() - start < 20
        assert "stopped after 1 s" in (tmp_path / "s.sock.timeouts.log").read_text()
        assert "forkserver: stopped at the 1 s deadline" in said[-1]
        flag.write_text("0")
        assert run(*args) == 0 and len((tmp_path / "s.sock.timeouts.log").read_text().splitlines()) == 1
        assert "forkserver: stopped" not in said[-1]
    finally:
        run("--stop")
        server.wait(30)
