"""Training never runs code from shard or checkpoint contents (issue 14, item 2).

Shards: only the members the build stage writes are decoded, each with a safe decoder
(images through the download stage's pixel guard, json, utf-8 text, .npy without
pickles); anything else (``.pickle``, ``.pyd``, ``.pth`` ...) is dropped and counted. A
dataset directory trains only on shards whose completion record's sha256 matches;
``pipe:`` and webdataset's other shell openers are refused unless allowed. Resume loads
only files mmloom wrote (a sha256 manifest), each torch file with ``weights_only=True``.
Every hostile payload here would create a marker directory if it ever ran.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
import yaml
from PIL import Image

from mmloom.configbase import load_model
from mmloom.errors import UserError
from mmloom.train.config import DataConfig, PromptConfig, TrainConfig

GOOD = [f"k{i:04d}" for i in range(6)]
MAX_PIXELS = 1_000_000


class Boom:
    """Unpickling this runs ``os.makedirs(path)``: the stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def jpeg(size, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def bomb_jpeg(w: int, h: int) -> bytes:
    """A small JPEG whose SOF0 header declares w x h pixels (a decompression bomb's header)."""
    data = bytearray(jpeg((16, 16)))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 7] = h.to_bytes(2, "big")
    data[i + 7:i + 9] = w.to_bytes(2, "big")
    return bytes(data)


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def sample_members(key: str, i: int) -> dict[str, bytes]:
    segs = [{"type": "text", "text": "a "},
            {"type": "image", "member": "crop0.jpg", "phrase": "red circle", "label": "red circle"},
            {"type": "text", "text": "red circle"}]
    return {"jpg": jpeg((64, 48), (40 * i, 30, 30)), "crop0.jpg": jpeg((20, 30)), "txt": b"a red circle",
            "raw.txt": b"A red circle!", "prompt.json": json.dumps({"segments": segs}).encode(),
            "scores.json": b'{"clip_score": 0.3}', "json": json.dumps({"key": key, "weight": 1.0}).encode()}


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as t:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def commit_tar(root: str, shard: int, samples) -> None:
    """A final/ shard committed the way the build stage commits it (completion record with sha256)."""
    from mmloom.manifests.store import ShardStore, shard_name

    store = ShardStore(root)
    staging = store.staging_dir("final", shard)
    write_tar(os.path.join(staging, "final.tar"), samples)
    store.commit("build", shard, {f"final/{shard_name(shard)}.tar": os.path.join(staging, "final.tar")},
                 {"rows": len(samples)}, "test")
    store.discard(staging)


@pytest.fixture(scope="module")
def markers(tmp_path_factory):
    d = tmp_path_factory.mktemp("markers")
    yield d
    assert not list(d.iterdir()), f"a hostile payload ran: {sorted(os.listdir(d))}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, markers):
    """A dataset directory with two committed final/ shards; shard 0 carries the attacks."""
    root = str(tmp_path_factory.mktemp("hostile-ds"))
    s0 = []
    for i, key in enumerate(GOOD[:4]):
        m = sample_members(key, i)
        if i == 1:
            m["pickle"] = __import__("pickle").dumps(Boom(markers / "pickle"))
        if i == 2:
            m["pyd"] = __import__("pickle").dumps(Boom(markers / "pyd"))
            m["evil.pickle"] = __import__("pickle").dumps(Boom(markers / "evil-pickle"))
        if i == 3:
            m["pth"] = torch_bytes(Boom(markers / "pth"))
        s0.append((key, m))
    bomb = sample_members("bomb", 9)
    bomb["jpg"] = bomb_jpeg(60000, 60000)  # header only: 3.6 gigapixels declared
    big = sample_members("big", 9)
    big["jpg"] = jpeg((1200, 1000))  # a real image, above this run's max_pixels
    s0 += [("bomb", bomb), ("big", big), ("lonely", {"pth": torch_bytes(Boom(markers / "lonely"))})]
    commit_tar(root, 0, s0)
    commit_tar(root, 1, [(key, sample_members(key, i)) for i, key in enumerate(GOOD[4:], 4)])
    return root


def data_cfg(shards, **kw):
    return DataConfig(shards=shards, resolution=32, shuffle_buffer=0, resampled=False, use_weights=False,
                      max_pixels=MAX_PIXELS, **kw)


def one_pass(cfg: DataConfig):
    from mmloom.train.data import make_dataset
    from mmloom.train.prompts import PromptBuilder

    ds = make_dataset(cfg, PromptBuilder(PromptConfig(crop_size=32, augment_prob=0)), seed=0)
    return ds, list(ds)


# ---------------------------------------------------------------- shard members
def test_only_mmloom_members_are_decoded_and_the_other_samples_stay(dataset, markers, caplog):
    caplog.set_level(logging.WARNING, logger="mmloom.train.data")
    ds, examples = one_pass(data_cfg(dataset))
    assert not list(markers.iterdir())
    assert sorted(e["key"] for e in examples) == GOOD  # hostile members dropped, their samples kept
    for e in examples:
        assert e["caption"] == "a red circle" and len(e["prompt"].images) == 1 and e["pixels"].shape == (3, 32, 32)
    # .pickle, .pyd, evil.pickle, .pth and the lone .pth: dropped and counted, never read
    assert ds.members.count == 5 and ds.members.by_suffix == {"pickle": 1, "pyd": 1, "evil.pickle": 1, "pth": 2}
    # both oversized images refused on their header, each sample named, nothing else lost
    assert ds.corrupt.count == 2
    # (Pillow's own bomb check fires first at 2x its limit; imageguard's pixel count below that)
    assert any("bomb.jpg" in r and ("60000x60000" in r or "3600000000 pixels" in r) for r in ds.corrupt.reasons)
    assert any("big.jpg" in r and "1200x1000" in r and "above max_pixels" in r for r in ds.corrupt.reasons)
    assert "k0001.pickle" in caplog.text and "dropped" in caplog.text


def test_a_member_above_max_member_bytes_is_skipped_unread(tmp_path):
    from mmloom.train.data import make_dataset

    big = sample_members("huge", 0)
    big["txt"] = b"x" * 4096  # declared size above the cap: never read into memory
    commit_tar(str(tmp_path), 0, [("huge", big), *[(k, sample_members(k, i)) for i, k in enumerate(GOOD[:2])]])
    from mmloom.train.prompts import PromptBuilder

    ds = make_dataset(data_cfg(str(tmp_path), max_member_bytes=2048), PromptBuilder(PromptConfig(crop_size=32, augment_prob=0)), seed=0)
    examples = list(ds)
    assert any("huge.txt is 4096 bytes, above data.max_member_bytes 2048" in r for r in ds.corrupt.reasons)
    assert set(GOOD[:2]) <= {e["key"] for e in examples}


def layout2_members(key: str, rect) -> dict[str, bytes]:
    """A sample in the build stage's layout: one crops.jpg and its rectangles in prompt.json."""
    segs = [{"type": "text", "text": "a ", "crop": -1}, {"type": "image", "text": "", "crop": 0},
            {"type": "text", "text": "red circle", "crop": -1}]
    crops = [{"kind": "object", "phrase": "red circle", "span": [2, 12], "box": [0.0, 0.0, 20.0, 30.0], "score": 0.5,
              "label": "red circle", "rect": rect, "head": -1}]
    return {"jpg": jpeg((64, 48)), "crops.jpg": jpeg((20, 30)), "txt": b"a red circle", "raw.txt": b"A red circle!",
            "prompt.json": json.dumps({"segments": segs, "crops": crops}).encode(),
            "scores.json": b'{"clip_score": 0.3}', "json": json.dumps({"key": key, "weight": 1.0}).encode()}


def test_crop_rectangles_outside_crops_jpg_skip_the_sample(tmp_path):
    """crops.jpg goes through the pixel guard like every image; a rectangle that does not
    lie inside it (a shard that lies) skips that sample, named and counted."""
    samples = [("ok", layout2_members("ok", [0, 0, 20, 30])), ("wide", layout2_members("wide", [0, 0, 5000, 30])),
               ("neg", layout2_members("neg", [-4, 0, 10, 10])), ("text", layout2_members("text", "0,0,1,1"))]
    commit_tar(str(tmp_path), 0, samples)
    ds, examples = one_pass(data_cfg(str(tmp_path)))
    assert [e["key"] for e in examples] == ["ok"] and examples[0]["prompt"].images[0].size == (32, 32)
    assert ds.corrupt.count == 3 and all("outside crops.jpg" in r or "four integers" in r for r in ds.corrupt.reasons)


def test_member_decoders_are_an_explicit_map():
    import numpy as np

    from mmloom.train.data import decode_member

    assert decode_member("txt", "à".encode(), MAX_PIXELS) == "à"
    assert decode_member("prompt.json", b'{"segments": []}', MAX_PIXELS) == {"segments": []}
    buf = io.BytesIO()
    np.save(buf, np.arange(3, dtype=np.float32))
    assert decode_member("clip_image.npy", buf.getvalue(), MAX_PIXELS).tolist() == [0, 1, 2]
    buf = io.BytesIO()
    np.save(buf, np.array([Boom("/nonexistent/x")], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):  # an object array would need a pickle: refused
        decode_member("clip_image.npy", buf.getvalue(), MAX_PIXELS)
    assert decode_member("crop3_head.jpg", jpeg((8, 8)), MAX_PIXELS).size == (8, 8)
    for name in ("pickle", "pyd", "pth", "npz", "mp", "cbor", "ten", "crop0.pickle", "json.pyd"):
        assert decode_member(name, b"", MAX_PIXELS) is None, name


def test_training_on_the_hostile_shards_completes(run, markers):
    assert run["steps"] == 4
    assert not list(markers.iterdir())
    assert run["skipped_members"] >= 1 and run["corrupt_samples"] >= 1
    last = run["history"][-1]
    assert last["data/skipped_members"] >= 1 and torch.isfinite(torch.tensor(last["loss"]))


# ---------------------------------------------------------------- which shards
def test_a_tar_whose_sha256_does_not_match_its_record_is_refused(dataset, tmp_path):
    from mmloom.train.data import shard_urls

    root = str(tmp_path / "ds")
    shutil.copytree(dataset, root)
    p = os.path.join(root, "final", "00001.tar")
    data = bytearray(open(p, "rb").read())
    data[700] ^= 0xFF  # same size: only the checksum tells
    open(p, "wb").write(bytes(data))
    with pytest.raises(UserError, match=r"final/00001\.tar.*sha256.*_commits/build/00001\.json"):
        shard_urls(root)
    with pytest.raises(UserError, match=r"00001\.tar"):
        shard_urls(os.path.join(root, "final"))  # the final/ folder of a dataset is verified too


def test_unrecorded_tars_are_skipped_and_no_verified_shard_is_an_error(dataset, tmp_path, caplog):
    from mmloom.train.data import shard_urls

    root = str(tmp_path / "ds")
    shutil.copytree(dataset, root)
    write_tar(os.path.join(root, "final", "00002.tar"), [("x", sample_members("x", 0))])
    caplog.set_level(logging.WARNING, logger="mmloom.train.data")
    urls = shard_urls(root)
    assert [os.path.basename(u) for u in urls] == ["00000.tar", "00001.tar"]
    assert "00002.tar" in caplog.text and "no completion record" in caplog.text
    shutil.rmtree(os.path.join(root, "_commits"))
    with pytest.raises(UserError, match=f"{root}.*no final/ shard with a matching completion record"):
        shard_urls(root)


def test_tars_named_explicitly_are_used_with_one_warning(dataset, caplog):
    from mmloom.train.data import shard_urls

    caplog.set_level(logging.WARNING, logger="mmloom.train.data")
    urls = shard_urls(os.path.join(dataset, "final", "*.tar"))
    assert [os.path.basename(u) for u in urls] == ["00000.tar", "00001.tar"]
    warnings = [r for r in caplog.records if "unverified" in r.getMessage()]
    assert len(warnings) == 1


# ---------------------------------------------------------------- shell openers
def test_pipe_shards_are_refused_unless_allowed(dataset, markers, tmp_path):
    from mmloom.cli import build_parser

    marker = markers / "pipe"
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump({"family": "mumu", "loop": {"out": str(tmp_path / "out"), "steps": 1}}))
    try:
        r = subprocess.run([sys.executable, "-m", "mmloom", "train", str(cfg), "--shards", f"pipe:mkdir {marker}"],
                           capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("mmloom train ran the pipe: command (and then waited on its empty output)")
    assert r.returncode == 2 and "pipe:" in r.stderr and "--allow-pipe" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
    assert getattr(build_parser().parse_args(["train", str(cfg), "--allow-pipe"]), "data__allow_pipe") is True

    # with the flag (or data.allow_pipe) the user's own command feeds the shards
    tar = os.path.join(dataset, "final", "00001.tar")
    ds, examples = one_pass(data_cfg(f"pipe:cat {tar}", allow_pipe=True))
    assert sorted(e["key"] for e in examples) == GOOD[4:]


@pytest.mark.parametrize("spec", ["sftp://host/x.tar", "scp://host/x.tar", "ais://bucket/x.tar",
                                  "htgs://host/x.tar", "hf://datasets/a/b/x.tar", "ftps://host/{0..1}.tar",
                                  "PIPE:ls"])
def test_webdataset_shell_openers_are_refused(spec):
    from mmloom.train.data import shard_urls

    with pytest.raises(UserError, match="shell"):
        shard_urls(spec)


def test_http_shards_are_opened_without_a_shell(markers):
    """webdataset opens http(s) with ``curl '<url>'`` in a shell: a quote in the URL ran code."""
    marker = markers / "curl"
    spec = f"http://127.0.0.1:9/x'$(mkdir {marker})'.tar"
    ds, examples = one_pass(data_cfg(spec))
    assert examples == [] and ds.corrupt.count >= 1  # connection refused: counted, nothing ran
    assert not marker.exists()


# ---------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mmloom.testkit.tiny_train import make_tiny_mumu

    return make_tiny_mumu(str(tmp_path_factory.mktemp("tinymumu")), "a red circle".split())


def run_cfg(tiny, shards, out, steps):
    return {"family": "mumu", "model": {**tiny, "lr": {"adapter": 1e-3, "unet": 1e-3}}, "prompt": {"crop_size": 32},
            "data": {"shards": shards, "resolution": 32, "shuffle_buffer": 4, "max_pixels": MAX_PIXELS},
            "loop": {"out": out, "steps": steps, "batch_size": 2, "checkpoint_every": 4, "tensorboard": False,
                     "ema_decay": 0.9}}


@pytest.fixture(scope="module")
def run(tiny, dataset, tmp_path_factory):
    from mmloom.train.loop import train

    out = str(tmp_path_factory.mktemp("run") / "out")
    r = train(load_model(TrainConfig, data=run_cfg(tiny, dataset, out, 4)), echo=lambda *a: None)
    return {**r, "cfg": run_cfg(tiny, dataset, out, 4)}


def copy_run(run, tmp_path):
    from mmloom.train.loop import latest_checkpoint

    out = str(tmp_path / "run")
    shutil.copytree(run["out"], out)
    cfg = {**run["cfg"], "loop": {**run["cfg"]["loop"], "out": out, "steps": 5}}
    return out, latest_checkpoint(out), cfg


def resume(cfg):
    from mmloom.train.loop import train

    return train(load_model(TrainConfig, data=cfg), echo=lambda *a: None)


def test_resume_from_an_untouched_checkpoint(run, tmp_path):
    out, ck, cfg = copy_run(run, tmp_path)
    assert ck.endswith("step_00000004")
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "mmloom_checkpoint.json"} <= set(os.listdir(ck))
    assert not any(n.startswith("custom_checkpoint") for n in os.listdir(ck))  # mmloom's own state is JSON/safetensors
    assert resume(cfg)["steps"] == 5


@pytest.mark.parametrize("name", ["random_states_0.pkl", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"])
def test_resume_refuses_a_planted_pickle(run, tmp_path, markers, name):
    out, ck, cfg = copy_run(run, tmp_path)
    marker = markers / f"ckpt-{name}"
    torch.save(Boom(marker), os.path.join(ck, name))
    with pytest.raises(UserError, match=rf"{name}.*(does not match|not written by mmloom)"):
        resume(cfg)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "scheduler.bin"])
def test_resume_refuses_a_pickle_even_with_a_rewritten_manifest(run, tmp_path, markers, name):
    """An attacker who can rewrite the manifest still runs nothing: every torch file is
    loaded weights-only, and a refusal names the file."""
    out, ck, cfg = copy_run(run, tmp_path)
    marker = markers / f"manifest-{name}"
    p = os.path.join(ck, name)
    torch.save(Boom(marker), p)
    mpath = os.path.join(ck, "mmloom_checkpoint.json")
    manifest = json.load(open(mpath)) if os.path.exists(mpath) else {"files": {}}
    manifest["files"][name] = {"bytes": os.path.getsize(p), "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest()}
    json.dump(manifest, open(mpath, "w"))
    with pytest.raises(UserError, match=rf"{name}.*weights-only"):
        resume(cfg)
    assert not marker.exists()


def test_sampling_refuses_weights_that_do_not_match_the_manifest(run, tmp_path):
    from mmloom.train.sample import load_for_sampling

    out, ck, cfg = copy_run(run, tmp_path)
    p = os.path.join(ck, "model.safetensors")
    data = bytearray(open(p, "rb").read())
    data[-8] ^= 0xFF
    open(p, "wb").write(bytes(data))
    with pytest.raises(UserError, match=r"model\.safetensors.*does not match"):
        load_for_sampling(out)


def test_embedding_statistics_scan_decodes_only_the_embeddings(tmp_path, markers):
    """Kandinsky's statistics pass over a folder of tars reads shards outside the trainer."""
    import numpy as np

    from mmloom.train.embed_stats import embedding_stats

    def npy(v):
        buf = io.BytesIO()
        np.save(buf, np.asarray(v, np.float32))
        return buf.getvalue()

    write_tar(tmp_path / "00000.tar", [
        ("a", {"clip_image.npy": npy([1, 2]), "pickle": __import__("pickle").dumps(Boom(markers / "stats-pickle"))}),
        ("b", {"clip_image.npy": npy([3, 4]), "pth": torch_bytes(Boom(markers / "stats-pth"))}),
    ])
    mean, std, n = embedding_stats(str(tmp_path / "*.tar"))
    assert n == 2 and mean.tolist() == [2, 3] and std.tolist() == [1, 1]
    assert not (markers / "stats-pickle").exists() and not (markers / "stats-pth").exists()
