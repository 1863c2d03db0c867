"""`mmloom run` end to end on a local server with tiny real-format models: final shards
read back with plain webdataset, prompts reassemble to the clean caption, spans index it,
a rebuild is byte-identical, and a second run resumes with nothing to do."""

import glob
import re
import hashlib
import os

import numpy as np
import pandas as pd
import pytest

from conftest import RAW_CAPTIONS
from mmloom.manifests.store import ShardStore

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]  # the whole pipeline and every family's demo training (minutes)


def test_second_run_resumes_with_nothing_to_do(pipeline_run):
    _root, _pipe, _logs, logs2 = pipeline_run
    for stage in ("download", "score", "ground", "build"):
        line = next(l for l in logs2 if l.startswith(f"[{stage}]"))
        assert re.match(rf"\[{stage}\] 0 shard\(s\) (downloaded|scored|grounded|built)\b", line), line


def test_detection_spans_index_the_clean_caption(pipeline_run):
    root = pipeline_run[0]
    det = pd.concat([pd.read_parquet(p) for p in glob.glob(f"{root}/detections/*.parquet")])
    sel = pd.read_parquet(f"{root}/selected").set_index("sample_key")
    assert len(det) > 0
    for r in det.itertuples():
        clean = sel.loc[r.sample_key, "clean_caption"]
        assert clean[r.span_start:r.span_end] == r.phrase
        assert 0 <= r.box[0] < r.box[2] <= r.image_width and 0 <= r.box[1] < r.box[3] <= r.image_height
    assert "[IMG_0042]" not in " ".join(sel.clean_caption) and "http" not in " ".join(sel.clean_caption)


def test_final_shards_read_with_plain_webdataset(pipeline_run):
    import webdataset as wds

    root = pipeline_run[0]
    tars = sorted(glob.glob(f"{root}/final/*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    manifest = pd.read_parquet(f"{root}/manifest")  # one table per folder
    assert len(samples) == (manifest.status == "built").sum() > 0
    for s in samples:
        p = s["prompt.json"]
        segs, crops = p["segments"], p["crops"]
        assert "".join(x["text"] for x in segs) == s["txt"]
        images = [x for x in segs if x["type"] == "image"]
        assert 1 <= len(images) <= 3
        W, H = s["crops.jpg"].size
        for c in crops:
            x0, y0, x1, y1 = c["rect"]
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H and x0 % 16 == 0
        for x in images:
            c = crops[x["crop"]]
            assert c["kind"] == "object" and s["txt"][c["span"][0]:c["span"][1]] == c["phrase"]
            if c["head"] >= 0:
                assert crops[c["head"]]["kind"] == "head" and c["label"] == "person"
        assert s["jpg"].size[0] > 0 and "clip_score" in s["scores.json"] and s["json"]["weight"] in (1.0, 2.0)
    # the score stage's stored CLIP image embedding travels with each sample
    con = __import__("mmloom.manifests.views", fromlist=["open_dataset"]).open_dataset(str(root))
    stored = {k: (e, n) for k, e, n in con.execute("SELECT sample_key, clip_image_embedding, clip_image_norm FROM scores").fetchall()}
    norms = []
    for s in samples:
        unit, norm = stored[s["json"]["sample_key"]]
        assert s["clip_image.npy"].shape == (32,) and np.linalg.norm(unit) == pytest.approx(1.0, abs=1e-5)
        # at CLIP's own scale (image_embeds, what Kandinsky's released weights take): the unit vector times its norm
        assert list(s["clip_image.npy"]) == pytest.approx([x * norm for x in unit], abs=1e-5)
        norms.append(norm)
    assert all(abs(n - 1.0) > 1e-3 for n in norms)  # the tiny CLIP's raw embeddings are not unit vectors


def test_views_and_card(pipeline_run):
    from mmloom.manifests.views import open_dataset, view_names

    root = pipeline_run[0]
    con = open_dataset(str(root))
    assert {"detections", "crops", "final"} <= set(view_names(con))
    n_crops = con.execute("SELECT count(*) FROM crops").fetchall()[0][0]
    assert n_crops == con.execute("SELECT sum(n_crops) FROM final WHERE status = 'built'").fetchall()[0][0]
    card = (root / "README.md").read_text()
    assert "## Funnel" in card and "FINAL (built)" in card and "## Example prompts" in card and "## Config" in card
    assert (root / "card" / "scores.png").exists()
    # a Hugging Face dataset card: front matter the Hub reads, licence left to the user
    from huggingface_hub import DatasetCard

    data = DatasetCard.load(root / "README.md").data.to_dict()
    assert data["size_categories"] == ["n<1K"] and "license" not in data
    assert data["configs"][0]["data_files"][0]["path"] == "final/*.tar"
    assert {f["name"] for f in data["dataset_info"]["features"]} >= {"jpg", "crops.jpg", "prompt.json", "clip_image.npy"}
    # the funnel goes on past SELECTED: grounded, then built
    from mmloom.curate.stats import funnel, render

    f = funnel(str(root))
    text = render(f)
    assert text.index("SELECTED") < text.index("grounded") < text.index("FINAL (built)")
    assert f["built"]["built"] == con.execute("SELECT count(*) FROM final WHERE status = 'built'").fetchall()[0][0]
    assert f["crops"][0] == n_crops


def test_build_twice_is_byte_identical(pipeline_run):
    from mmloom.curate.build import build
    from mmloom.curate.dataset import dataset_config

    root = str(pipeline_run[0])
    digest = lambda: {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in sorted(glob.glob(f"{root}/final/*.*"))}  # noqa: E731
    before = digest()
    store = ShardStore(root)
    for s in store.committed_shards("build"):
        store.uncommit("build", s)
    s = build(root, dataset_config(root, None), progress=False)
    assert s["ran"] == len(store.committed_shards("build")) > 0
    assert digest() == before


@pytest.mark.parametrize("family", ["mvader", "versatile", "mtdiffusion", "kandinsky"])
def test_family_tiny_configs_train_on_the_built_shards_and_sample(pipeline_run, family, tiny_cache, tmp_path):
    """What `mmloom demo --family F` runs after the pipeline: each tiny config trains on the
    final shards (Kandinsky: prior normalized with the dataset's stored embeddings, then
    the decoder, sampled through the prior) with falling loss, and one image comes out."""
    from PIL import Image

    from mmloom.curate.demo import train_demo
    from mmloom.train.loop import read_metrics

    root = str(pipeline_run[0])
    logs = []
    r = train_demo(root, None, echo=logs.append, steps=20, family=family)
    for run in r["runs"].values():
        hist = read_metrics(run)
        assert len(hist) == 20
        assert sum(h["loss"] for h in hist[-5:]) < sum(h["loss"] for h in hist[:5]), (run, [h["loss"] for h in hist])
    assert Image.open(r["sample"]).size == (64, 64)
    if family == "kandinsky":
        from safetensors.torch import load_file

        from mmloom.train.embed_stats import embedding_stats
        from mmloom.train.loop import latest_checkpoint

        mean, _std, n = embedding_stats(root)
        state = load_file(f"{latest_checkpoint(r['runs']['kandinsky-prior-tiny'])}/model.safetensors")
        assert int(state["norm.count"]) == n and state["norm.mean"].numpy() == pytest.approx(mean, abs=1e-6)
    if family == "versatile":
        _versatile_sampling_knobs(r["runs"]["versatile-tiny"], tmp_path)
    if family == "mtdiffusion":
        _mtdiffusion_restore_cli(r["runs"]["mtdiffusion-tiny"], tmp_path)
    if family == "mvader":
        from mmloom.cli import main

        assert main(["sample", r["runs"]["mvader-tiny"], "--prompt", "x", "--restore"]) == 2  # not its option


def _mtdiffusion_restore_cli(run, tmp):
    """`mmloom sample --restore` (section 4.1): the black patch is restored, every other
    pixel comes back as given; a --mask that cannot be read is named."""
    import numpy as np
    from PIL import Image

    from mmloom.cli import main

    arr = np.random.default_rng(1).integers(1, 255, (64, 64, 3), dtype=np.uint8)
    arr[8:24, 8:24] = 0
    Image.fromarray(arr).save(tmp / "masked.png")
    out = tmp / "restored.png"
    fast = ["--set", "model.schedule.num_train_timesteps=4", "--seeds", "0"]
    assert main(["sample", run, "--prompt", f"<image:{tmp / 'masked.png'}>", "--restore", "--out", str(out), *fast]) == 0
    got = np.asarray(Image.open(out))
    hole = np.zeros((64, 64), bool)
    hole[8:24, 8:24] = True
    assert np.array_equal(got[~hole], arr[~hole]) and got[hole].any()
    assert main(["sample", run, "--prompt", f"<image:{tmp / 'masked.png'}>", "--mask", str(tmp / "nope.png"), *fast]) == 2


def _versatile_sampling_knobs(run, tmp):
    """`mmloom sample --set` reaches the rebuilt model: with attention-level mixing at
    mix_rate 1 a text-and-image prompt samples exactly the text-only image; image scales
    must match the prompt's images; `--text` writes one sentence per seed."""
    import numpy as np
    from PIL import Image

    from mmloom.cli import main

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp / "red.png")
    common = ["--seeds", "3", "--steps", "4", "--size", "64"]

    def image(prompt, *extra):
        out = tmp / f"s{abs(hash((prompt, extra)))}.png"
        assert main(["sample", run, "--prompt", prompt, "--out", str(out), *common, *extra]) == 0
        return np.asarray(Image.open(out), dtype=np.int16)

    prev = os.getcwd()
    os.chdir(tmp)
    try:
        text_only = image("a red square")
        both = "a red square <image:red.png>"
        assert np.array_equal(image(both, "--set", "model.mix_rate=1"), text_only)
        assert not np.array_equal(image(both, "--set", "model.mix_rate=0"), text_only)
        assert main(["sample", run, "--prompt", "<image:red.png> <image:red.png>", "--out", str(tmp / "x.png"),
                     *common, "--set", "model.image_scales=[1]"]) == 2  # one scale for two images
        assert main(["sample", run, "--prompt", "x", *common, "--set", "model.mix_rte=1"]) == 2  # unknown field
        out = tmp / "caption.txt"
        assert main(["sample", run, "--prompt", "<image:red.png>", "--text", "--out", str(out),
                     "--seeds", "0", "1", "--steps", "3", "--guidance", "1"]) == 0
        lines = out.read_text().splitlines()
        assert [ln.split("\t")[0] for ln in lines] == ["0", "1"]
    finally:
        os.chdir(prev)


def test_ground_stage_runs_the_original_grounding_dino_package(pipeline_run, tmp_path):
    """`ground.backend: groundingdino` on the pipeline's selection: the changed backend
    redoes every shard, and the detections have the transformers backend's schema with
    spans that index the clean caption, tagged with the package's version."""
    import shutil

    import pyarrow.parquet as pq

    from mmloom.curate.config import GroundConfig
    from mmloom.curate.dataset import dataset_config
    from mmloom.curate.ground import ground
    from mmloom.testkit.tiny_scoring import make_original_grounding_dino

    root = tmp_path / "ds"
    shutil.copytree(pipeline_run[0], root)
    cfg = dataset_config(str(root), None)
    words = sorted({w for c in RAW_CAPTIONS for w in c.lower().replace("\u201c", " ").replace("\u201d", " ").split()})
    section = make_original_grounding_dino(str(tmp_path / "gd"), words)
    gcfg = GroundConfig.model_validate({**cfg.ground.model_dump(), "backend": "groundingdino", "groundingdino": section,
                                        "box_threshold": 0.0, "text_threshold": 0.0, "head_source": "none"})
    s = ground(str(root), cfg.model_copy(update={"ground": gcfg}), progress=False)
    before = sorted(glob.glob(f"{pipeline_run[0]}/detections/*.parquet"))
    assert s["ran"] == len(before) > 0 and not s["failed"]
    sel = pd.read_parquet(f"{root}/selected").set_index("sample_key")
    for path in sorted(glob.glob(f"{root}/detections/*.parquet")):
        t = pq.read_table(path)
        assert t.schema.remove_metadata() == pq.read_table(before[0]).schema.remove_metadata()
        assert t.schema.metadata[b"version"].startswith(b"groundingdino-py")
        for r in t.to_pandas().itertuples():
            assert sel.loc[r.sample_key, "clean_caption"][r.span_start:r.span_end] == r.phrase
    assert s["boxes"] > 0
