"""One writer per dataset directory.

Two ``mmloom download`` runs on one directory would delete each other's staging files
and fetch the same URLs twice. Every command that writes a dataset holds
``DIR/_commits/writer.lock`` (host, pid, command, since, heartbeat) while it runs; a
second writer stops with one line naming the holder. Readers (query, stats, verify
without --repair) never take it.

A lock is taken over when its holder is dead: on the same host, when the pid no longer
runs; from another host, when its heartbeat (rewritten every ``HEARTBEAT_S`` seconds by
the holder) is older than ``STALE_S``. The lock is re-entrant within one process, so
``mmloom run`` and the stages it calls share it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager

from mmloom.errors import UserError

LOCK_NAME = "writer.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0

_held: dict[str, int] = {}  # lock path -> depth, for this process
_guard = threading.Lock()


class DatasetLocked(UserError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_dead(info: dict) -> bool:
    if info.get("host") == socket.gethostname():
        return not _alive(int(info.get("pid", -1)))
    return time.time() - float(info.get("heartbeat", 0)) > STALE_S


def describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    return f"host {info.get('host')!s}, pid {info.get('pid')!s}, `{info.get('command', '?')}` since {since}"


class WriterLock:
    def __init__(self, store, command: str):
        from .store import COMMITS

        self.store = store
        self.path = store.path(COMMITS, LOCK_NAME)
        self.command = command
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _info(self, since: float) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                "since": since, "heartbeat": time.time(), "token": self.token}

    def _read(self) -> dict | None:
        try:
            with self.store.fs.open(self.path, "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # half-written or garbage: treated as a dead holder

    def _create(self, info: dict) -> bool:
        """Create the lock file if absent (exclusive on local disks)."""
        fs = self.store.fs
        fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        if self.store.is_local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            return True
        # object stores have no exclusive create: write, then read back to see who won
        if fs.exists(self.path):
            return False
        with fs.open(self.path, "w") as f:
            json.dump(info, f)
        time.sleep(0.5)
        return (self._read() or {}).get("token") == self.token

    def acquire(self) -> None:
        since = time.time()
        for _ in range(3):
            if self._create(self._info(since)):
                break
            holder = self._read()
            if holder is None:
                continue  # released meanwhile
            if holder and not _holder_dead(holder):
                raise DatasetLocked(
                    f"{self.store.root} is being written by {describe(holder)}; wait for it to finish "
                    f"(a dead holder's lock is taken over automatically)")
            # dead holder: move its lock aside under a unique name, then race for a new one
            stale = f"{self.path}.stale-{self.token}"
            try:
                self.store.fs.mv(self.path, stale)
                self.store.fs.rm_file(stale)
            except FileNotFoundError:
                pass
        else:
            raise DatasetLocked(f"{self.store.root}: could not take the writer lock {self.path}")
        self._thread = threading.Thread(target=self._beat, args=(since,), daemon=True, name="mmloom-lock-heartbeat")
        self._thread.start()

    def _beat(self, since: float) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if (self._read() or {}).get("token") != self.token:
                    return  # taken over (we were presumed dead): stop touching it
                self.store.write_json_atomic(self.path, self._info(since))
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if (self._read() or {}).get("token") == self.token:
            self.store.fs.rm_file(self.path)


@contextmanager
def writer_lock(root: str, command: str):
    """Hold the dataset's writer lock for the block (re-entrant in one process); pending
    commits of an interrupted earlier writer are finished or abandoned on entry."""
    from .store import ShardStore

    store = ShardStore(root)
    key = store.root
    with _guard:
        depth = _held.get(key, 0)
        _held[key] = depth + 1
    lock = None
    try:
        if depth == 0:
            lock = WriterLock(store, command)
            lock.acquire()
            for line in store.recover():
                print(f"mmloom: {line}", file=sys.stderr)
        yield store
    finally:
        with _guard:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        if lock is not None:
            lock.release()
