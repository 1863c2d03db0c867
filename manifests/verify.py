"""`mmloom verify DIR [--repair]`: check every committed file against its record.

Each completion record lists its files with byte size and sha256. ``verify`` re-reads
them all and lists each file that is missing, has another size or another hash, each
record that can't be parsed, and each interrupted commit. With ``repair`` it finishes
or abandons interrupted commits and marks the affected shards not done (``affected``),
so that the next run of each stage redoes exactly those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .schemas import STAGE_ORDER
from .store import COMMITS, CorruptFile, ShardStore

# the order in which stages consume each other's output
STAGES = STAGE_ORDER
GLOBAL_STAGES = {"select"}
SUMMARY = "ingest.json"  # ingest's summary, beside the records  # one shard (0) made from every shard of the stages before it


@dataclass
class Problem:
    stage: str
    shard: int
    file: str
    problem: str

    def line(self) -> str:
        return f"{self.file}: {self.problem} ({self.stage} shard {self.shard})"


@dataclass
class Report:
    files: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    repaired: list[tuple[str, int]] = field(default_factory=list)


def _stages_on_disk(store: ShardStore) -> list[str]:
    base = store.path(COMMITS)
    if not store.fs.exists(base):
        return []
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(base, detail=False) if store.fs.isdir(p)}
    return [s for s in STAGES if s in names] + sorted(names - set(STAGES))


def check(store: ShardStore, progress: bool = True) -> Report:
    from tqdm import tqdm

    from mmloom import progress_enabled

    rep = Report()
    rep.pending = store.pending_commits()
    summary = store.path(COMMITS, SUMMARY)
    if store.fs.exists(summary):
        try:
            json.loads(store.fs.cat_file(summary))
        except (ValueError, UnicodeDecodeError) as e:
            rep.problems.append(Problem("ingest", -1, store.url(COMMITS, SUMMARY), f"unreadable ingest summary ({e})"))
    work = [(stage, shard) for stage in _stages_on_disk(store) for shard in store.committed_shards(stage)]
    for stage, shard in tqdm(work, desc="verify", unit="shard", disable=not progress_enabled(progress), leave=False):
        try:
            rec = store.record(stage, shard)
        except CorruptFile as e:
            rep.problems.append(Problem(stage, shard, e.path, e.problem))
            continue
        rep.files += len(rec["files"])
        rep.bytes += sum(meta.get("bytes", 0) for meta in rec["files"].values())
        for rel, problem in store.file_problems(rec, verify_checksums=True):
            rep.problems.append(Problem(stage, shard, store.url(rel), problem))
    return rep


def affected(problems: list[Problem], store: ShardStore) -> list[tuple[str, int]]:
    """(stage, shard) pairs to mark not done: each bad shard, and for a bad download
    shard the same shard of every later stage plus the selection, since a re-download
    can fetch other bytes. The other stages are deterministic: redone, they write the
    file their record describes, so what was built from it stays valid."""
    out: set[tuple[str, int]] = set()
    for p in problems:
        if p.shard < 0:  # the ingest summary: removed, not a shard
            continue
        out.add((p.stage, p.shard))
        if p.stage == "download":
            for later in STAGES[STAGES.index("download") + 1:]:
                out.add((later, 0 if later in GLOBAL_STAGES else p.shard))
    return sorted((s, n) for s, n in out if store.fs.exists(store.record_path(s, n)))


def verify(root: str, repair: bool = False, progress: bool = True) -> Report:
    store = ShardStore(root)
    if not store.fs.isdir(store.base):
        from mmloom.errors import UserError

        raise UserError(f"no dataset directory {root}")
    rep = check(store, progress)
    if repair:
        for line in store.recover():
            rep.pending.append(line)
        for stage, shard in affected(rep.problems, store):
            store.uncommit(stage, shard)
            rep.repaired.append((stage, shard))
        if any(p.file.endswith(SUMMARY) for p in rep.problems):
            store.fs.rm_file(store.path(COMMITS, SUMMARY))  # ingest writes it anew
            rep.repaired.append(("ingest", -1))
    return rep

