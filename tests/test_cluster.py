"""A real multi-node Ray cluster on this machine (a head and two worker nodes, separate
process groups with their own resources): stages run through its address, a worker node
killed mid-stage loses no sample, a killed driver's rerun skips committed shards, and a
Ray Train run whose worker node dies resumes from its last checkpoint."""

import glob
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from conftest import write_laion
from mmloom.testkit.localserver import LocalServer, Route
from mmloom.manifests.store import ShardStore
from mmloom.testkit.local_cluster import LocalCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(workers=2, cpus_per_worker=1)
    yield c
    c.stop()


def mmloom(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "mmloom", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def slow_dataset(tmp_path, images, srv, n=18, delay=0.6):
    urls = [srv.add(f"/slow/{i}.jpg", Route(images[i % len(images)][1], delay=delay)) for i in range(n)]
    src = write_laion(tmp_path / "m.parquet", [{"url": u, "text": f"image {i}"} for i, u in enumerate(urls)])
    root = str(tmp_path / "ds")
    r = subprocess.run([sys.executable, "-m", "mmloom", "ingest", src, "--out", root, "--shard-size", "3", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return root, urls


def download_until_a_shard_commits(cluster, root):
    """Start `mmloom download` through the cluster as its own process group; return it
    once the first shard is committed (mid-stage)."""
    p = mmloom("download", root, "--ray-address", cluster.address, "--allow-private-addresses", "--thread-count", "1", "--no-progress")
    assert wait_for(lambda: ShardStore(root).committed_shards("download"))
    return p


def rerun_download(cluster, root):
    r = subprocess.run([sys.executable, "-m", "mmloom", "download", root, "--ray-address", cluster.address,
                        "--allow-private-addresses", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def wait_for(cond, timeout=240, every=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


def check_every_sample_once(root, urls):
    df = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(f"{root}/images/*.parquet"))])
    assert len(df) == len(urls) and df.sample_key.is_unique and set(df.url) == set(urls)
    assert (df.status == "success").all(), df[df.status != "success"][["url", "status", "error_message"]]


def test_worker_node_killed_mid_download(cluster, tmp_path, images):
    with LocalServer({}) as srv:
        root, urls = slow_dataset(tmp_path, images, srv)
        p = download_until_a_shard_commits(cluster, root)
        cluster.kill_worker(0)  # a whole node, mid-stage
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:  # lost shards are listed; a rerun finishes them
            rerun_download(cluster, root)
        check_every_sample_once(root, urls)
    cluster.add_worker()


def test_killed_driver_rerun_skips_committed_shards(cluster, tmp_path, images):
    with LocalServer({}) as srv:
        root, urls = slow_dataset(tmp_path, images, srv)
        store = ShardStore(root)
        p = download_until_a_shard_commits(cluster, root)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        done = store.committed_shards("download")
        assert 1 <= len(done) < 6
        r = rerun_download(cluster, root)
        assert f"{6 - len(done)} shard(s) downloaded, {len(done)} already done" in r.stdout
        check_every_sample_once(root, urls)


def test_ray_train_resumes_after_losing_the_worker_node(cluster, tmp_path):
    from mmloom.testkit.tiny_train import make_tiny_mumu

    data = tmp_path / "final"
    data.mkdir()
    _write_final_shards(str(data))
    model = make_tiny_mumu(str(tmp_path / "models"), "a red circle".split())
    out = str(tmp_path / "run")
    cfg = {"family": "mumu", "model": {**model, "lr": {"adapter": 1e-3}},
           "prompt": {"crop_size": 64}, "data": {"shards": str(data), "resolution": 64, "shuffle_buffer": 4},
           "loop": {"out": out, "steps": 40, "batch_size": 2, "checkpoint_every": 5, "tensorboard": False}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.Popen([sys.executable, "-m", "mmloom.ray_jobs.train", str(tmp_path / "t.yaml"), "--num-workers", "1",
                          "--max-failures", "3", "--ray-address", cluster.address],
                         start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    from mmloom.train.loop import latest_checkpoint

    assert wait_for(lambda: latest_checkpoint(out) is not None, timeout=300)
    # kill the node that runs the training worker
    worker = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
    assert worker, "no Ray Train worker process found"
    node = cluster.node_of(int(worker[0]))
    assert node is not None, "the training worker runs on no worker node"
    cluster.kill_worker(node)
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-3000:]
    resumes = open(os.path.join(out, "resumes.log")).read()
    assert "resumed at step" in resumes and "resumed at step 0" not in resumes
    steps = [int(__import__("json").loads(line)["step"]) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert max(steps) == 40 and set(range(1, 41)) <= set(steps)
    cluster.add_worker()


def _write_final_shards(d: str) -> None:
    import io
    import json
    import tarfile

    from PIL import Image

    for s in range(2):
        with tarfile.open(os.path.join(d, f"{s:05d}.tar"), "w") as t:
            for i in range(6):
                files = {}
                for ext, size in (("jpg", (64, 48)), ("crop0.jpg", (20, 20))):
                    buf = io.BytesIO()
                    Image.new("RGB", size, (40 * i, 200, 30 * s)).save(buf, "JPEG")
                    files[ext] = buf.getvalue()
                files["prompt.json"] = json.dumps({"segments": [
                    {"type": "text", "text": "a "},
                    {"type": "image", "member": "crop0.jpg", "phrase": "red circle", "span": [2, 12], "box": [0, 0, 20, 20],
                     "score": 0.5, "label": "red circle"},
                    {"type": "text", "text": "red circle"}]}).encode()
                files["json"] = b'{"weight": 2.0}'
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{s}{i:05d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))


def test_whole_run_through_the_cluster_to_s3(cluster, tmp_path, images, s3_bucket):
    """`mmloom run` through the cluster's address, every stage writing to an S3 bucket;
    DuckDB queries it and training reads its shards from there."""
    import webdataset as wds

    from mmloom.testkit.tiny_scoring import make_grounding_dino, make_score_models
    from mmloom.manifests.views import open_dataset
    from mmloom.train.data import shard_urls

    captions = ["a woman astronaut in a white spacesuit", "a cup of coffee on a saucer", "a ginger cat", "a red circle"]
    names = ["astronaut.jpg", "coffee.jpg", "chelsea.jpg", "shape0.jpg"]
    by_name = {n: d for n, d, *_ in images}
    score_cfg = make_score_models(str(tmp_path / "models"))
    dino = make_grounding_dino(str(tmp_path / "models" / "dino"), sorted({w for c in captions for w in c.split()}))
    out = f"{s3_bucket}/whole-run"
    with LocalServer({}) as srv:
        rows = [{"url": srv.add(f"/i/{n}", Route(by_name[n])), "text": c} for n, c in zip(names, captions)]
        write_laion(tmp_path / "meta.parquet", rows)
        pipe = {"run": {"sources": ["meta.parquet"], "out": out}, "ingest": {"shard_size": 2},
                "download": {"allow_private_addresses": True, "image_size": 256}, "score": score_cfg,
                "select": {"min_clip_score": None, "max_watermark": None, "max_nsfw": None, "dedup_max_distance": None},
                "ground": {"model": dino, "box_threshold": 0.3}, "build": {"min_crop_area": 100, "min_crops": 1}}
        (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(pipe))
        cmd = [sys.executable, "-m", "mmloom", "run", "pipe.yaml", "--ray-address", cluster.address, "--no-progress"]
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
    assert "[download] 0 shard(s) downloaded, 2 already done" in again.stdout
    assert not list(tmp_path.glob("s3*")), "wrote to a local folder named after the URL"

    store = ShardStore(out)
    for stage, n in (("ingest", 2), ("download", 2), ("score", 2), ("select", 1)):
        assert store.committed_shards(stage) == list(range(n)), stage
    built = store.committed_shards("build")
    assert built and all(store.is_committed("build", s, verify_checksums=True) for s in built)
    assert store.exists("README.md") and store.exists("card", "scores.png") and store.exists("mmloom.yaml")
    con = open_dataset(out)
    assert con.execute("SELECT count(*) FROM downloads WHERE status = 'success'").fetchall()[0][0] == 4
    n_final = con.execute("SELECT count(*) FROM final WHERE status = 'built'").fetchall()[0][0]
    assert n_final >= 1

    urls = shard_urls(out)
    assert urls and all(u.startswith("s3://mmloom-test/whole-run/final/") for u in urls)
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == n_final and all("prompt.json" in s and "jpg" in s for s in samples)
