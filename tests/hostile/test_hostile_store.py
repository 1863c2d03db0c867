"""Torn commits, two writers, silent corruption, and a Ray cluster without token auth
(issue 14 items 6, 7, 8 and 10)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_laion
from mmloom.cli import main
from mmloom.curate.config import load_config
from mmloom.curate.download import download
from mmloom.curate.ingest import ingest
from mmloom.curate.score import download_rows, read_images
from mmloom.manifests import lock as lockmod
from mmloom.manifests.store import CorruptFile, ShardStore
from mmloom.manifests.verify import verify


# -- helpers -------------------------------------------------------------------------
def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _status(keys_ok: list[str], keys_failed: list[str] = ()) -> bytes:
    rows = [{"sample_key": f"sk-{k}", "key": k, "status": "success"} for k in keys_ok]
    rows += [{"sample_key": f"sk-{k}", "key": k, "status": "failed_to_download"} for k in keys_failed]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _commit_download(store: ShardStore, shard: int, tar: bytes, status: bytes) -> None:
    staging = store.staging_dir("images", shard)
    for name, data in (("x.tar", tar), ("x.parquet", status)):
        with open(os.path.join(staging, name), "wb") as f:
            f.write(data)
    store.commit("download", shard, {f"images/{shard:05d}.tar": os.path.join(staging, "x.tar"),
                                     f"images/{shard:05d}.parquet": os.path.join(staging, "x.parquet")}, {"rows": 1}, "h")
    store.discard(staging)


def _staged(store: ShardStore, shard: int, tar: bytes, status: bytes) -> tuple[dict, str]:
    staging = store.staging_dir("images", shard)
    files = {}
    for rel, data in ((f"images/{shard:05d}.tar", tar), (f"images/{shard:05d}.parquet", status)):
        p = os.path.join(staging, rel.rsplit("/", 1)[1])
        with open(p, "wb") as f:
            f.write(data)
        files[rel] = p
    return files, staging


# -- item 6: a recommit cut short never shows a torn pair -----------------------------
def test_recommit_killed_between_files_is_never_seen_torn_and_is_finished(tmp_path, monkeypatch):
    store = ShardStore(str(tmp_path / "ds"))
    _commit_download(store, 0, _tar({"a.jpg": b"A"}), _status(["a"], ["b"]))
    new_tar, new_status = _tar({"a.jpg": b"A", "b.jpg": b"B"}), _status(["a", "b"])
    files, _ = _staged(store, 0, new_tar, new_status)

    real_move = store._move
    moved = []

    def move_then_die(staged, final):  # the process dies after the first file moved
        if moved:
            raise KeyboardInterrupt("killed")
        moved.append(final)
        return real_move(staged, final)

    monkeypatch.setattr(store, "_move", move_then_die)
    with pytest.raises(KeyboardInterrupt):
        store.commit("download", 0, files, {"rows": 2}, "h2")
    assert len(moved) == 1

    # readers never see the new parquet with the old tar: the shard does not exist now
    fresh = ShardStore(store.root)
    assert not fresh.is_committed("download", 0)
    assert fresh.committed_shards("download") == []
    # the next writer finishes the commit from its journal
    lines = fresh.recover()
    assert lines == ["download shard 0: interrupted commit finished"]
    assert fresh.is_committed("download", 0, verify_checksums=True)
    assert fresh.read_verified("download", 0, "images/00000.tar") == new_tar
    assert fresh.record("download", 0)["config_hash"] == "h2"
    assert not verify(store.root, progress=False).problems


def test_interrupted_commit_without_its_staged_files_is_redone(tmp_path, monkeypatch):
    store = ShardStore(str(tmp_path / "ds"))
    _commit_download(store, 1, _tar({"a.jpg": b"A"}), _status(["a"]))
    files, staging = _staged(store, 1, _tar({"a.jpg": b"A2"}), _status(["a"]))
    monkeypatch.setattr(store, "_apply_moves", lambda f: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        store.commit("download", 1, files, {"rows": 1}, "h2")
    store.discard(staging)  # e.g. another machine's temp folder: gone
    fresh = ShardStore(store.root)
    assert fresh.recover() == ["download shard 1: interrupted commit abandoned; the shard will be redone"]
    assert not fresh.is_committed("download", 1) and fresh.pending_commits() == []


def test_score_refuses_a_shard_whose_parquet_lists_images_its_tar_lacks(tmp_path):
    """A torn pair must fail the shard (retried later), never become permanent score_error rows."""
    store = ShardStore(str(tmp_path / "ds"))
    _commit_download(store, 0, _tar({"a.jpg": b"A"}), _status(["a", "b"]))
    blobs = read_images(store, 0, "jpg")
    with pytest.raises(CorruptFile, match=r"images/00000.parquet: lists 1 successful image\(s\) that its tar lacks \(first: b.jpg\)"):
        download_rows(store, 0, blobs, "jpg")


def test_flipped_byte_is_caught_on_read_with_the_file_named(tmp_path):
    store = ShardStore(str(tmp_path / "ds"))
    tar = _tar({"a.jpg": b"\xff\xd8" + b"A" * 600 + b"\xff\xd9", "b.jpg": b"B" * 600})
    _commit_download(store, 0, tar, _status(["a", "b"]))
    path = store.path("images/00000.tar")
    data = bytearray(open(path, "rb").read())
    data[512 + 100] ^= 0x01  # inside a.jpg's bytes: same size, other content
    open(path, "wb").write(bytes(data))
    assert store.is_committed("download", 0)  # sizes alone can't tell
    with pytest.raises(CorruptFile, match=r"images/00000.tar: sha256 differs"):
        read_images(store, 0, "jpg")
    data[0] ^= 0xFF  # a broken tar header: still named
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptFile, match=r"images/00000.tar"):
        read_images(store, 0, "jpg")


# -- item 8: mmloom verify [--repair] on a real downloaded dataset ---------------------
@pytest.mark.usefixtures("ray_local")
def test_verify_names_bad_files_and_repair_redoes_only_their_shards(tmp_path, server, images, capsys):
    urls = [server.url(f"/img/{n}") for n, *_ in images[:6]]
    src = write_laion(tmp_path / "meta.parquet", [{"url": u, "text": f"caption {i}"} for i, u in enumerate(urls)])
    cfg = load_config(None, {"ingest.shard_size": 2, "download.allow_private_addresses": True})
    root = str(tmp_path / "ds")
    ingest([src], root, cfg, progress=False)
    assert download(root, cfg, progress=False)["committed"] == 3
    assert main(["verify", root, "--no-progress"]) == 0
    assert "0 bad" in capsys.readouterr().out

    tar1 = os.path.join(root, "images", "00001.tar")
    data = bytearray(open(tar1, "rb").read())
    data[len(data) // 2] ^= 0x55  # one flipped byte in the middle of an image
    open(tar1, "wb").write(bytes(data))
    cand2 = os.path.join(root, "candidates", "00002.parquet")
    open(cand2, "ab").write(b"junk")  # another size

    assert main(["verify", root, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"BAD {tar1}: sha256 differs from its completion record (download shard 1)" in out
    assert f"BAD {cand2}:" in out and "(ingest shard 2)" in out
    assert "2 bad" in out and "--repair" in out
    # a stage reading the corrupt tar names it instead of using it
    with pytest.raises(CorruptFile, match="00001.tar"):
        read_images(ShardStore(root), 1, "jpg")

    assert main(["verify", root, "--repair", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "download 00001" in out and "ingest 00002" in out
    store = ShardStore(root)
    assert store.committed_shards("download") == [0, 2] and store.committed_shards("ingest") == [0, 1]
    before = {s: store.record("download", s)["committed_at"] for s in (0, 2)}
    ingest([src], root, cfg, progress=False)  # redoes ingest shard 2 only
    s = download(root, cfg, progress=False)
    assert s["ran"] == 1 and s["skipped"] == 2 and s["committed"] == 3
    assert {s: store.record("download", s)["committed_at"] for s in (0, 2)} == before
    assert main(["verify", root, "--no-progress"]) == 0


# -- item 7: one writer per dataset ---------------------------------------------------
HOLD = """
import sys, time
from mmloom.manifests.lock import writer_lock
with writer_lock(sys.argv[1], "download"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    root = str(tmp_path / "ds")
    os.makedirs(root)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, root], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        staging = os.path.join(root, "images", "_tmp", "00000-other")
        os.makedirs(staging)
        assert main(["download", root, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is being written by host" in err
        assert f"pid {holder.pid}" in err and socket.gethostname() in err and "`download` since" in err
        assert os.path.isdir(staging)  # the other run's staging files are untouched
        # readers need no lock
        assert main(["stats", root]) == 0
        assert main(["verify", root, "--no-progress"]) == 0
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is taken over
    with lockmod.writer_lock(root, "score") as store:
        info = json.load(open(store.path("_commits", "writer.lock")))
        assert info["pid"] == os.getpid() and info["command"] == "score"
        with lockmod.writer_lock(root, "select"):  # re-entrant in one process
            pass
        assert os.path.exists(store.path("_commits", "writer.lock"))
    assert not os.path.exists(os.path.join(root, "_commits", "writer.lock"))


def test_lock_of_another_host_is_respected_until_its_heartbeat_is_stale(tmp_path):
    root = tmp_path / "ds"
    (root / "_commits").mkdir(parents=True)
    info = {"host": "other-node", "pid": 1, "command": "run laion.yaml", "since": time.time() - 60,
            "heartbeat": time.time() - 10, "token": "x"}
    (root / "_commits" / "writer.lock").write_text(json.dumps(info))
    with pytest.raises(lockmod.DatasetLocked, match="host other-node, pid 1, `run laion.yaml`"):
        with lockmod.writer_lock(str(root), "download"):
            pass
    info["heartbeat"] = time.time() - lockmod.STALE_S - 1
    (root / "_commits" / "writer.lock").write_text(json.dumps(info))
    with lockmod.writer_lock(str(root), "download"):
        assert json.loads((root / "_commits" / "writer.lock").read_text())["host"] == socket.gethostname()


# -- item 10: a cluster started without token auth, on a machine that has a token ------
DRIVER = """
import os, sys
os.environ.pop("RAY_AUTH_MODE", None)
from mmloom.curate.runner import run_shards
def work(shard):
    import ray
    @ray.remote
    def inner(x):  # a nested task calls back into its owner
        return x * 2
    return {"v": ray.get(inner.remote(shard))}
run = run_shards("probe", list(range(6)), work, {}, ray_address=sys.argv[1], progress=False)
print("ok", len(run.results), "failed", len(run.failures), [f.get("error", "")[:80] for f in run.failures])
"""


@pytest.mark.slow
def test_cluster_without_token_auth_runs_every_shard(tmp_path):
    from mmloom.testkit.local_cluster import LocalCluster

    token = os.path.expanduser("~/.ray/auth_token")
    if not os.path.exists(token):  # the machine state the bug needs: an earlier local Ray made a token
        os.makedirs(os.path.dirname(token), exist_ok=True)
        with open(token, "w") as f:
            f.write("mmloom-test-token-" + os.urandom(8).hex())
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    c = LocalCluster(workers=1, cpus_per_worker=2, auth_mode="disabled")
    try:
        r = subprocess.run([sys.executable, "-c", DRIVER, c.address], capture_output=True, text=True, env=env, timeout=300)
        assert r.stdout.strip().splitlines()[-1] == "ok 6 failed 0 []", r.stdout + r.stderr[-2000:]
        # a user who insists on token mode is told at once what to change
        code = "from mmloom.rayauth import configure_for; import sys; configure_for(sys.argv[1])"
        r = subprocess.run([sys.executable, "-c", code, c.address], capture_output=True, text=True,
                           env={**env, "RAY_AUTH_MODE": "token"}, timeout=120)
        assert r.returncode == 1 and "runs without token authentication but RAY_AUTH_MODE=token" in r.stderr
    finally:
        c.stop()


def test_object_store_path_with_glob_characters(s3_bucket, tmp_path):
    """`[`, `*` in a dataset URL are names, never patterns (fsspec's rm and glob expand them)."""
    store = ShardStore(f"{s3_bucket}/odd[1]*'ds")
    _commit_download(store, 0, _tar({"a.jpg": b"A"}), _status(["a"]))
    files, _ = _staged(store, 0, _tar({"a.jpg": b"A2"}), _status(["a"]))
    store.commit("download", 0, files, {"rows": 1}, "h2")  # a recommit removes files
    assert store.pending_commits() == [] and store.recover() == []
    store.fs.pipe_file(store.path("images", "_tmp", "00000-x", "left.tar"), b"x")
    store.clean_staging(["images"])
    assert not store.fs.exists(store.path("images", "_tmp", "00000-x", "left.tar"))
    assert store.read_verified("download", 0, "images/00000.tar") == _tar({"a.jpg": b"A2"})
    assert not verify(store.root, progress=False).problems
