"""Item 5 of issue 15: each family trains on the CLIP embeddings its curation config stores.
configs/laion.yaml stores ViT-B/32's 512-d; Kandinsky 2.1 needs ViT-L/14's 768-d
(configs/laion-kandinsky.yaml) and MT-Diffusion on SD 2 (E.4) ViT-H/14's 1024-d
(configs/laion-mtdiffusion.yaml). A mismatch is one UserError before any model builds."""

import io
import os
import tarfile

import numpy as np
import pytest

from mmloom.curate.config import load_config
from mmloom.errors import UserError
from mmloom.train.config import TrainConfig
from mmloom.train.embed_stats import clip_width
from mmloom.train.families import get_family

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _train_cfg(name: str, **over) -> TrainConfig:
    import yaml

    with open(os.path.join(CONFIGS, "train", name)) as f:
        raw = yaml.safe_load(f)
    for key, value in over.items():  # "model.encoder.path": ...
        *path, last = key.split(".")
        d = raw
        for p in path:
            d = d.setdefault(p, {})
        d[last] = value
    return TrainConfig.model_validate(raw)


@pytest.mark.parametrize("curation, training, width", [
    ("laion-kandinsky.yaml", "kandinsky-2-1.yaml", 768), ("laion-mtdiffusion.yaml", "mtdiffusion-sd2-clip.yaml", 1024)])
def test_each_family_curation_config_stores_what_it_trains_on(curation, training, width):
    cur = load_config(os.path.join(CONFIGS, curation))
    assert cur.score.clip.store_embeddings and clip_width(cur.score.clip.model) == width
    tc = _train_cfg(training)
    trains_on = clip_width(tc.model.encoder.path) if tc.family == "kandinsky" else tc.model.embedding_dim
    assert trains_on == width
    assert tc.data.shards.endswith(curation.removesuffix(".yaml"))  # its example path is that curation's output
    # the paper's 0.3 rule stays on LAION's ViT-B/32 column; no uncalibrated cut on another model's scale
    assert cur.ingest.prefilter.min_clip_similarity == 0.3 and cur.select.min_clip_score is None
    assert clip_width(load_config(os.path.join(CONFIGS, "laion.yaml")).score.clip.model) == 512


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _curate_shards(root, clip_ref: str, n: int = 8) -> str:
    """Final shards as the score and build stages store them: the picture, its caption and
    KEY.clip_image.npy from the curation config's score.clip.model (mmloom.clip, as the score stage)."""
    from PIL import Image

    from mmloom.clip import ClipEmbedder

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    images = [Image.new("RGB", (64, 64), colours[i % 4]) for i in range(n)]
    emb = ClipEmbedder(clip_ref).images(images).numpy()
    path = os.path.join(root, "shard-000000.tar")
    with tarfile.open(path, "w") as tar:
        for i, (im, e) in enumerate(zip(images, emb)):
            buf = io.BytesIO()
            im.save(buf, format="JPEG")
            members = {"jpg": buf.getvalue(), "txt": b"a red circle", "prompt.json": b'{"segments": []}',
                       "json": f'{{"key": "{i:04d}", "weight": 1.0}}'.encode(), "clip_image.npy": _npy(e)}
            for name, data in ((f"{i:04d}.{m}", d) for m, d in members.items()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, tiny_cache):
    """laion-kandinsky.yaml's curation with its CLIP swapped for the tiny one (32-d)."""
    from mmloom.testkit.tiny_train import resolve_tiny

    cur = load_config(os.path.join(CONFIGS, "laion-kandinsky.yaml"), {"score": {"clip": {"model": resolve_tiny("tiny:clip")}}})
    return _curate_shards(str(tmp_path_factory.mktemp("curated")), cur.score.clip.model), clip_width(cur.score.clip.model)


def test_the_curation_width_flows_into_shards_and_the_tiny_family_trains_on_them(tiny_shards, tmp_path):
    from mmloom.train.embed_stats import stored_width
    from mmloom.train.loop import read_metrics, train

    shards, width = tiny_shards
    assert stored_width(shards) == width == 32
    cfg = _train_cfg("kandinsky-prior-tiny.yaml", **{"data.shards": shards, "loop.out": str(tmp_path / "run"), "loop.steps": 2,
                                                     "loop.checkpoint_every": 2, "model.prior_layers": 1})
    train(cfg, echo=lambda *a, **k: None)
    assert len(read_metrics(str(tmp_path / "run"))) == 2


def _stop_building(monkeypatch, model_cls) -> None:
    """Building ``model_cls`` raises "the model was built": a test tells a family's build
    that stopped at its width check (UserError) from one that went on to the model."""
    def never(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(model_cls, "__init__", never)


@pytest.mark.parametrize("family, config, over, want, fix", [
    ("kandinsky", "kandinsky-prior-tiny.yaml", {"model.encoder.path": "ViT-L-14/openai"}, "768-d", "configs/laion-kandinsky.yaml"),
    ("mtdiffusion", "mtdiffusion-tiny.yaml", {"model.task": "image_representation", "model.embedding_dim": 1024}, "1024-d",
     "configs/laion-mtdiffusion.yaml"),
])
def test_a_width_mismatch_is_one_line_before_the_model_builds(tiny_shards, monkeypatch, family, config, over, want, fix):
    import importlib

    mod = importlib.import_module(f"mmloom.train.families.{family}")
    _stop_building(monkeypatch, mod.KandinskyModel if family == "kandinsky" else mod.MTDiffusionModel)
    cfg = _train_cfg(config, **{"data.shards": tiny_shards[0], **over})
    with pytest.raises(UserError) as e:
        get_family(family).build(cfg.model, cfg)
    msg = str(e.value)
    assert "\n" not in msg and "32-d" in msg and want in msg and fix in msg, msg


@pytest.mark.parametrize("stage, stored, checked", [("prior", False, True), ("decoder", True, True), ("decoder", False, False)])
def test_kandinsky_checks_the_stored_width_wherever_it_reads_stored_embeddings(tiny_shards, monkeypatch, stage, stored, checked):
    """The prior learns from the stored embeddings whatever ``model.use_stored_embeddings``
    says, so its build checks their width either way; the decoder checks it only when it
    reads them: with ``use_stored_embeddings: false`` it embeds each picture itself and
    builds on shards of any stored width (here 32-d beside a 768-d CLIP)."""
    from mmloom.train.families.kandinsky import KandinskyModel

    _stop_building(monkeypatch, KandinskyModel)
    cfg = _train_cfg(f"kandinsky-{stage}-tiny.yaml", **{"data.shards": tiny_shards[0], "model.encoder.path": "ViT-L-14/openai",
                                                       "model.use_stored_embeddings": stored})
    with pytest.raises(UserError if checked else AssertionError, match="768-d" if checked else "the model was built"):
        get_family("kandinsky").build(cfg.model, cfg)


@pytest.mark.parametrize("task", ["masked_image", "image_translation", "image_label"])
def test_mtdiffusion_checks_the_stored_width_only_for_image_representation(tiny_shards, monkeypatch, task):
    """Only E.4's task reads the stored CLIP embeddings (the mismatch case is above): the
    picture and label tasks build on shards of any stored width (32-d beside
    model.embedding_dim 1024)."""
    from mmloom.train.families.mtdiffusion import MTDiffusionModel

    _stop_building(monkeypatch, MTDiffusionModel)
    cfg = _train_cfg("mtdiffusion-tiny.yaml", **{"data.shards": tiny_shards[0], "model.task": task, "model.embedding_dim": 1024,
                                                 "model.labels": ["cat"]})
    with pytest.raises(AssertionError, match="the model was built"):
        get_family("mtdiffusion").build(cfg.model, cfg)


def test_the_stored_width_is_read_from_a_dataset_manifests(tmp_path):
    """A dataset directory: the width comes from the score stage's scores/ (one DuckDB row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmloom.manifests.store import ShardStore
    from mmloom.train.embed_stats import check_stored_width, stored_width

    store = ShardStore(str(tmp_path / "ds"))
    staging = store.staging_dir("scores", 0)
    pq.write_table(pa.table({"sample_key": ["a", "b"], "clip_image_embedding": [None, [0.1] * 768]}), f"{staging}/s.parquet")
    store.commit("score", 0, {"scores/00000.parquet": f"{staging}/s.parquet"}, {"rows": 2}, "h")
    assert stored_width(str(tmp_path / "ds")) == 768
    check_stored_width(str(tmp_path / "ds"), False, 768, "model.encoder.path", "ViT-L-14/openai")
    with pytest.raises(UserError, match="768-d CLIP image embeddings but model.embedding_dim 1024 needs 1024-d.*laion-mtdiffusion"):
        check_stored_width(str(tmp_path / "ds"), False, 1024, "model.embedding_dim", 1024)
    assert stored_width(str(tmp_path / "nowhere")) is None  # no data here (a run sampled elsewhere): the loader says so later


def test_the_released_prior_trains_on_curated_shards_and_its_checkpoint_keeps_the_statistics(tmp_path, tiny_cache):
    """prior: released on shards of tiny:clip-l's width: the dataset statistics written into
    prior.clip_mean/clip_std survive the checkpoint (the prior's frozen tensors are rebuilt
    from its source at load; the statistics come back from norm.mean/std)."""
    from mmloom.testkit.tiny_train import resolve_tiny
    from mmloom.train.embed_stats import embedding_stats
    from mmloom.train.loop import read_metrics, train
    from mmloom.train.sample import load_for_sampling

    shards = _curate_shards(str(tmp_path), resolve_tiny("tiny:clip-l"), n=4)
    out = str(tmp_path / "run")
    cfg = _train_cfg("kandinsky-prior-tiny.yaml", **{
        "data.shards": shards, "loop.out": out, "loop.steps": 2, "loop.checkpoint_every": 2, "model.prior": "released",
        "model.encoder.path": "tiny:clip-l", "model.prior_model": {"path": "tiny:kandinsky-prior", "subfolder": "prior"}})
    train(cfg, echo=lambda *a, **k: None)
    assert len(read_metrics(out)) == 2
    mean, std, n = embedding_stats(shards)
    _fam, model, _cfg = load_for_sampling(out)
    assert int(model.norm.count) == n == 4
    np.testing.assert_allclose(model.prior.clip_mean[0].numpy(), mean, atol=1e-5)
    np.testing.assert_allclose(model.prior.clip_std[0].numpy(), std, atol=1e-4)
    assert model.prior_embed(["a dog"], steps=2).shape == (1, 32)

    # a decoder's text prompts go through this run (model.prior_checkpoint), loaded once,
    # with the prompt's seed; a run that is not a Kandinsky prior is refused, naming it
    import torch

    import mmloom.train.sample as sample_mod

    dcfg = _train_cfg("kandinsky-decoder-tiny.yaml", **{"data.shards": shards, "model.encoder.path": "tiny:clip-l",
                                                        "model.prior_checkpoint": out})
    decoder = get_family("kandinsky").build(dcfg.model, dcfg)
    emb, text = decoder.embed_prompt(["a dog"], seed=3)
    prior = decoder._load_prior()
    assert text == "a dog" and prior is decoder._load_prior() and prior.cfg.stage == "prior"
    torch.testing.assert_close(emb, prior.prior_embed(["a dog"], seed=3)[0])
    assert not torch.allclose(emb, prior.prior_embed(["a dog"], seed=4)[0])
    assert not torch.allclose(emb, decoder.clip.texts(["a dog"], normalize=False)[0])  # not the no-prior stand-in
    for family, stage in (("kandinsky", "decoder"), ("mvader", "prior")):
        decoder._prior_model = None
        fake = type("Run", (), {"cfg": type("C", (), {"stage": stage})()})()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sample_mod, "load_for_sampling", lambda ck: (None, fake, type("T", (), {"family": family})()))
            with pytest.raises(UserError, match=f"model.prior_checkpoint {out} is not a Kandinsky prior run"):
                decoder.embed_prompt(["a dog"])
