"""A fork server for mutation runs: each mutant's test command otherwise spends most of its
time importing torch, diffusers and transformers and building the tiny models again.

    python bench/forkserver.py SOCKET -- PYTEST ARGS       # serve (warmed up with one run of ARGS)
    python bench/forkserver.py --run SOCKET PYTEST ARGS    # one run: exits with pytest's status

The server first runs the pytest ARGS once in a forked child, which writes down the
third-party modules it imported (everything whose file is outside this repository); the
server imports those, and nothing of the repository, then forks one child per request,
so each child imports mmloom's modules fresh from disk: the mutant cosmic-ray just wrote
(bytecode is never written, so a mutant's .pyc can't outlive it). The tiny random-weight
models (``tiny_cache``) are built once, by the warm-up run with the unmutated sources, and
reused; they are files in the released layouts, so the code under test still loads them.
Used by bench/mutation.sh when MUTATION_FORK=1.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import time
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "mutation", "tiny-cache")
# a run still going after this many seconds is stopped and answered TIMEOUT_EXIT (bench/mutation.sh
# sets it from the unmutated run's time, in SOCKET.deadline: a survivor runs every test, and a
# deadline under that time turned survivors into false kills); the warm-up run has none
DEADLINE = float(os.environ.get("MUTATION_DEADLINE", "280"))
TIMEOUT_EXIT = 124  # as timeout(1)


def _ours(module) -> bool:
    """A module of this repository (not of its .venv), or one without a file."""
    path = os.path.abspath(getattr(module, "__file__", None) or os.path.join(ROOT, "?"))
    return path.startswith(ROOT + os.sep) and not path.startswith(sys.prefix + os.sep)


def _pytest(args: list[str], modules_out: str | None = None) -> int:
    sys.dont_write_bytecode = True
    import _pytest.tmpdir
    import pytest

    real = _pytest.tmpdir.TempPathFactory.mktemp

    def mktemp(self, basename, numbered=True):  # one tiny-model cache for every run
        if basename == "tiny-cache":
            os.makedirs(TINY, exist_ok=True)
            from pathlib import Path

            return Path(TINY)
        return real(self, basename, numbered)

    _pytest.tmpdir.TempPathFactory.mktemp = mktemp
    rc = int(pytest.main(args))
    if modules_out:
        with open(modules_out, "w") as fh:
            json.dump(sorted(n for n, m in list(sys.modules.items()) if not _ours(m)), fh)
    return rc


def _child(args: list[str], log: str, modules_out: str | None = None, deadline: float | None = None) -> int:
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = _pytest(args, modules_out)
        finally:
            os._exit(code)
    # a mutant that loops for ever: killed here, before cosmic-ray's 300 s timeout (an alarm in
    # the child would not do: pytest-timeout's signal method re-arms SIGALRM for every test,
    # and the server, serving one run at a time, would block every later mutant behind it)
    stop = None if deadline is None else time.monotonic() + deadline
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if stop is not None and time.monotonic() > stop:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return TIMEOUT_EXIT
        time.sleep(0.05)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 4


def _deadline(path: str) -> float:
    """Seconds a run may take: ``SOCKET.deadline`` (bench/mutation.sh writes it once the
    unmutated run has been timed), else MUTATION_DEADLINE, else 280."""
    try:
        with open(path + ".deadline") as fh:
            return float(fh.read())
    except (OSError, ValueError):
        return DEADLINE


def serve(path: str, warm: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    mods = path + ".modules.json"
    rc = _child(warm, path + ".warm.log", mods)
    if rc != 0:
        sys.exit(f"forkserver: the warm-up run failed ({rc}); see {path}.warm.log")
    for name in json.load(open(mods)):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional piece that only loads in context
            pass
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print(f"forkserver: ready on {path}", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            args = json.loads(conn.makefile().readline())
            if args == ["--stop"]:
                conn.sendall(b"0\n")
                break
            deadline = _deadline(path)
            rc = _child(args, path + ".last.log", deadline=deadline)
            if rc == TIMEOUT_EXIT:  # counted by bench/mutation.sh: a timed-out mutant is not a plain kill
                with open(path + ".timeouts.log", "a") as fh:
                    fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} stopped after {deadline:.0f} s\n")
            conn.sendall(f"{rc}\n".encode())
    server.close()
    os.unlink(path)


def run(path: str, args: list[str]) -> int:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.sendall((json.dumps(args) + "\n").encode())
    rc = int(client.makefile().readline())
    if rc == TIMEOUT_EXIT:  # on stdout: cosmic-ray keeps it with the mutant, so the report can name it
        print(f"forkserver: stopped at the {_deadline(path):.0f} s deadline (a loop, or a survivor too slow), "
              "not a failing test", flush=True)
    return rc


if __name__ == "__main__":
    if sys.argv[1] == "--run":
        sys.exit(run(sys.argv[2], sys.argv[3:]))
    sock, sep, *warm = sys.argv[1:]
    assert sep == "--", __doc__
    serve(sock, warm)
