"""Atomic per-shard outputs and completion records.

A stage writes its files for one shard under temporary names inside the dataset
directory, renames them into place, and writes the completion record last. A shard
without a record does not exist; a rerun skips shards whose record is present and whose
files still match it. Works on any fsspec filesystem (local paths, s3://...); on object
stores the rename is a copy, but the record written last keeps the commit atomic all the
same.

Recommitting a shard (``download --retry-failed``) replaces several files. The commit
first writes a journal (``_commits/<stage>/NNNNN.pending.json``: the staged files and the
new record), then removes the old record, so readers stop seeing the shard before any
file changes; a commit killed half way is finished from the journal by the next writer
(``recover``), or, when its staged files are gone, the shard is simply redone. Readers
therefore only ever see a tar and a parquet that belong together.

Every file a record names carries its sha256; ``read_verified`` checks it on read and
``mmloom verify`` checks all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import fsspec

from mmloom import __version__
from mmloom.errors import UserError

COMMITS = "_commits"


def shard_name(shard: int) -> str:
    """img2dataset's naming: five zero-padded digits."""
    return f"{shard:05d}"


def config_hash(config: Any) -> str:
    """Stable short hash of a JSON-able config (recorded with every commit)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class CorruptFile(UserError):
    """A committed file that no longer matches its completion record (or cannot be parsed)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem} (run `mmloom verify DIR --repair`, then rerun the stage)")
        self.path = path
        self.problem = problem


def file_digest(fs, path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


@dataclass
class ShardStore:
    """Reads and writes one dataset directory's shards, for every stage."""

    root: str

    def __post_init__(self):
        self.root = str(self.root).rstrip("/")
        if "://" not in self.root:
            self.root = os.path.abspath(self.root)
        # other processes (Ray workers, other nodes) commit shards: never trust a cached listing
        opts = {"use_listings_cache": False} if "://" in self.root else {}
        self.fs, self.base = fsspec.core.url_to_fs(self.root, **opts)
        self.is_local = is_local_fs(self.fs)

    # -- paths -------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def url(self, *parts: str) -> str:
        """Path in the form a user or DuckDB gives it (keeps the s3:// prefix)."""
        return "/".join([self.root, *parts])

    def record_path(self, stage: str, shard: int) -> str:
        return self.path(COMMITS, stage, shard_name(shard) + ".json")

    def staging_dir(self, stage_dir: str, shard: int) -> str:
        """A fresh private local folder for one attempt at one shard.

        Inside the dataset directory when that is local (so the final rename is cheap);
        in the machine's temp folder when the dataset lives on an object store, where
        ``commit`` uploads the files."""
        name = f"{shard_name(shard)}-{uuid.uuid4().hex[:8]}"
        if self.is_local:
            d = self.path(stage_dir, "_tmp", name)
            os.makedirs(d, exist_ok=True)
            return d
        return tempfile.mkdtemp(prefix=f"mmloom-{stage_dir}-{name}-")

    @staticmethod
    def discard(staging: str) -> None:
        """Remove a staging folder (after its files were committed, or on failure)."""
        shutil.rmtree(staging, ignore_errors=True)

    # -- reading -----------------------------------------------------------------
    def record(self, stage: str, shard: int) -> dict | None:
        p = self.record_path(stage, shard)
        if not self.fs.exists(p):
            return None
        try:
            with self.fs.open(p, "r") as f:
                rec = json.load(f)
            if not isinstance(rec, dict) or not isinstance(rec.get("files"), dict):
                raise ValueError("not a completion record")
            return rec
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptFile(self.url(COMMITS, stage, shard_name(shard) + ".json"), f"unreadable completion record ({e})") from None

    def read_verified(self, stage: str, shard: int, rel: str) -> bytes:
        """The bytes of committed file ``rel`` of ``stage``'s shard, checked against the
        size and sha256 in its completion record (``CorruptFile`` names the file)."""
        rec = self.record(stage, shard)
        if rec is None or rel not in rec["files"]:
            raise CorruptFile(self.url(rel), f"no {stage} completion record lists it")
        meta = rec["files"][rel]
        try:
            with self.open(rel) as f:
                data = f.read()
        except FileNotFoundError:
            raise CorruptFile(self.url(rel), "missing") from None
        if len(data) != meta["bytes"]:
            raise CorruptFile(self.url(rel), f"{len(data)} bytes, its record says {meta['bytes']}")
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise CorruptFile(self.url(rel), "sha256 differs from its completion record")
        return data

    def read_table_verified(self, stage: str, shard: int, rel: str, columns: list[str] | None = None):
        """``read_verified`` for a parquet file, parsed (errors name the file)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = self.read_verified(stage, shard, rel)
        try:
            return pq.read_table(pa.BufferReader(data), columns=columns)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise CorruptFile(self.url(rel), f"unreadable parquet ({e})") from None

    def is_committed(self, stage: str, shard: int, verify_checksums: bool = False) -> bool:
        """True when the record exists and every file it names is there, same size
        (and same sha256 with ``verify_checksums``)."""
        rec = self.record(stage, shard)
        return rec is not None and self.matches(rec, verify_checksums)

    def matches(self, rec: dict, verify_checksums: bool = False) -> bool:
        """Every file of a record (read already) is as it describes."""
        return next(self.file_problems(rec, verify_checksums), None) is None

    def file_problems(self, rec: dict, verify_checksums: bool = False):
        """(path relative to the root, problem) for each file of ``rec`` that is missing
        or not what it records: its size, and with ``verify_checksums`` its sha256."""
        for rel, meta in sorted(rec["files"].items()):
            p = self.path(rel)
            if not self.fs.exists(p):
                yield rel, "missing"
                continue
            size = self.fs.size(p)
            if size != meta.get("bytes"):
                yield rel, f"{size} bytes, its record says {meta.get('bytes')}"
            elif verify_checksums and file_digest(self.fs, p)[1] != meta.get("sha256"):
                yield rel, "sha256 differs from its completion record"

    def committed_shards(self, stage: str) -> list[int]:
        d = self.path(COMMITS, stage)
        if not self.fs.exists(d):
            return []
        out = []
        for p in self.fs.ls(d, detail=False):
            name = p.rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                out.append(int(name[:-5]))
        return sorted(out)

    def read_table(self, *parts: str, columns: list[str] | None = None):
        """One parquet file of the dataset as an Arrow table (any filesystem)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.path(*parts), columns=columns, filesystem=self.fs)

    def open(self, *parts: str, mode: str = "rb"):
        return self.fs.open(self.path(*parts), mode)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small side file (card, figure) in one piece."""
        self._write_whole(self.path(rel), data)

    def _write_whole(self, final: str, data: bytes) -> None:
        """Readers see the old file or the new one: on a local disk a temporary name and a
        rename; on an object store one PUT, which is atomic by itself (and fsspec's mv
        would read `[` or `*` in the path as a glob)."""
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        if not self.is_local:
            self.fs.pipe_file(final, data)
            return
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)

    def records(self, stage: str) -> list[dict]:
        return [r for s in self.committed_shards(stage) if (r := self.record(stage, s))]

    # -- writing -----------------------------------------------------------------
    def commit(
        self,
        stage: str,
        shard: int,
        files: dict[str, str],
        counts: dict[str, int],
        cfg_hash: str,
        extra: dict | None = None,
    ) -> dict:
        """Move staged files into place, then write the completion record.

        ``files`` maps the final path relative to the dataset root (``images/00000.tar``)
        to the staged local path (in a folder from ``staging_dir``). A journal written
        first makes the switch all-or-nothing (module docstring).
        """
        entries = {rel: dict(zip(("bytes", "sha256"), file_digest(LOCAL, staged))) for rel, staged in sorted(files.items())}
        record = {
            "stage": stage,
            "shard": shard,
            "files": entries,
            "counts": counts,
            "config_hash": cfg_hash,
            "mmloom_version": __version__,
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        journal = self.journal_path(stage, shard)
        self.write_json_atomic(journal, {"moves": files, "record": record})
        self.uncommit(stage, shard)  # the old pair stops existing before any file changes
        self._apply_moves(files)
        self.write_json_atomic(self.record_path(stage, shard), record)
        self.fs.rm_file(journal)
        return record

    def journal_path(self, stage: str, shard: int) -> str:
        return self.path(COMMITS, stage, shard_name(shard) + ".pending.json")

    def _apply_moves(self, files: dict[str, str]) -> None:
        for rel, staged in sorted(files.items()):
            final = self.path(rel)
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            if self.fs.exists(final):
                self.fs.rm_file(final)
            self._move(staged, final)

    def _move(self, staged: str, final: str) -> None:
        """One staged local file into its final place (a rename on the same local disk)."""
        if self.is_local:
            shutil.move(staged, final)
        else:
            self.fs.put_file(staged, final)
            os.remove(staged)

    def pending_commits(self) -> list[str]:
        """Journals of commits that were interrupted (paths)."""
        base = self.path(COMMITS)
        if not self.fs.exists(base):
            return []
        out = []
        for d in self.fs.ls(base, detail=True):  # listings, not globs: the root may hold `[` or `*`
            if d["type"] == "directory":
                out += [p for p in self.fs.ls(d["name"], detail=False) if p.endswith(".pending.json")]
        return sorted(out)

    def recover(self) -> list[str]:
        """Finish or abandon interrupted commits; returns one line per journal.

        A journal whose staged files are all still there (or already in place with the
        recorded sha256) is rolled forward; otherwise it is dropped and its shard stays
        uncommitted, so the next run redoes it. Call before ``clean_staging``."""
        out = []
        for journal in self.pending_commits():
            name = journal.rsplit("/", 1)[-1]
            try:
                with self.fs.open(journal, "r") as f:
                    j = json.load(f)
                moves, record = j["moves"], j["record"]
            except (ValueError, KeyError, TypeError):
                self.fs.rm_file(journal)
                out.append(f"{name}: unreadable journal dropped; the shard will be redone")
                continue
            ready = True
            todo = {}
            for rel, staged in moves.items():
                if LOCAL.exists(staged):
                    todo[rel] = staged
                elif not (self.fs.exists(self.path(rel)) and file_digest(self.fs, self.path(rel))[1] == record["files"][rel]["sha256"]):
                    ready = False
            stage, shard = record["stage"], int(record["shard"])
            if ready:
                self.uncommit(stage, shard)
                self._apply_moves(todo)
                self.write_json_atomic(self.record_path(stage, shard), record)
                out.append(f"{stage} shard {shard}: interrupted commit finished")
            else:
                out.append(f"{stage} shard {shard}: interrupted commit abandoned; the shard will be redone")
            self.fs.rm_file(journal)
        return out

    def write_json_atomic(self, path: str, obj: Any) -> None:
        self._write_whole(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def uncommit(self, stage: str, shard: int) -> None:
        """Forget a shard (its record goes first, so it stops existing at once)."""
        p = self.record_path(stage, shard)
        if self.fs.exists(p):
            self.fs.rm_file(p)

    def clean_staging(self, stage_dirs: Iterable[str]) -> None:
        """Remove leftover staging folders (after finishing interrupted commits)."""
        self.recover()
        for sd in stage_dirs:
            p = self.path(sd, "_tmp")
            if self.is_local:
                shutil.rmtree(p, ignore_errors=True)
            elif self.fs.exists(p):
                for f in self.fs.find(p):  # file by file: fs.rm would expand `[`, `*` in the path as a glob
                    self.fs.rm_file(f)

    def duckdb(self):
        """A DuckDB connection that can read this dataset's URLs (``store.url(...)``).

        Remote filesystems are handed to DuckDB through fsspec, so s3:// and friends
        need no DuckDB extension (none can be downloaded on an offline cluster)."""
        import duckdb

        con = duckdb.connect()
        if not self.is_local:
            con.register_filesystem(self.fs)
        return con

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))



LOCAL = fsspec.filesystem("file")


def is_local_fs(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols
