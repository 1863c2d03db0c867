"""Each scorer loads through the real loading code from tiny random-weight models saved in
the real formats, and returns values in its range. nudenet, OpenCV and phash are real."""


import pytest
import torch
from PIL import Image

from mmloom.errors import UserError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mmloom.testkit.tiny_scoring import make_score_models

    root = tmp_path_factory.mktemp("models")
    return root, make_score_models(str(root))


def test_open_clip_local_dir_embeddings_normalized(models, pics):
    from mmloom.clip import ClipEmbedder

    e = ClipEmbedder(models[1]["clip"]["model"])
    img = e.images([pics["astronaut.jpg"], pics["coffee.jpg"]])
    txt = e.texts(["an astronaut", "coffee"])
    assert img.shape == (2, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    sim = (img * txt).sum(-1)
    assert ((sim >= -1) & (sim <= 1)).all()
    assert e.version.startswith("open_clip") and "sha256:" in e.version


def test_clip_pixels_are_open_clips_own_transform_bit_for_bit(models, pics):
    """The score stage hands uint8 pixels to the model and normalizes there (issue 16); the
    numbers must be open_clip's transform's exactly, for images of any size and shape."""
    from mmloom.clip import ClipEmbedder

    e = ClipEmbedder(models[1]["clip"]["model"])
    ims = [pics["astronaut.jpg"], pics["coffee.jpg"].resize((300, 170)), pics["astronaut.jpg"].resize((90, 260))]
    px = e.pixels(ims)
    assert px.dtype == torch.uint8 and px.shape == (3, 3, 64, 64)
    own = torch.stack([e.preprocess(im) for im in ims])
    assert torch.equal(e.inputs(ims), own)
    with torch.no_grad():
        want = e.model.encode_image(own).float()
    assert torch.equal(e.images(px, normalize=False), want)
    assert torch.equal(e.images(ims, normalize=False), want)


def test_clip_on_an_indexed_device_gives_the_same_embeddings(models, pics):
    """A device with an index ("cuda:1" on a GPU node; "cpu:0" here) reaches autocast as its
    type alone."""
    from mmloom.clip import ClipEmbedder

    ims = [pics["astronaut.jpg"], pics["coffee.jpg"]]
    a, b = ClipEmbedder(models[1]["clip"]["model"], "cpu:0"), ClipEmbedder(models[1]["clip"]["model"])
    assert torch.equal(a.images(ims), b.images(ims)) and torch.equal(a.texts(["an astronaut"]), b.texts(["an astronaut"]))


def test_clip_pixels_resized_where_the_model_runs_are_pillows(models, pics):
    """On a GPU the score stage resizes and crops where CLIP runs (`resize_on_device`,
    issue 16): the pixels must be those of open_clip's Pillow steps, bit for bit, for
    pictures of any size (a batch of two sizes, one image smaller than the crop, which
    takes Pillow's way) and the embeddings the same; a picture in another mode than RGB
    takes Pillow's way too. (Run here on the CPU; the arithmetic is exact on any device.)"""
    from mmloom.clip import ClipEmbedder

    ref = models[1]["clip"]["model"]
    cpu, dev = ClipEmbedder(ref), ClipEmbedder(ref, resize_on_device=True)
    assert dev._device_steps == (64, "bicubic", (64, 64))
    a, c = pics["astronaut.jpg"], pics["coffee.jpg"]
    ims = [a, c.resize((300, 170)), a.resize((90, 260)), c.resize((300, 170)), a.resize((40, 30))]
    calls = []
    groups = lambda: calls.append(1) or __import__("mmloom.pil_resample", fromlist=["x"]).upload(ims, "cpu")  # noqa: E731
    px = dev.pixels(ims, groups)
    assert calls == [1] and px.dtype == torch.uint8 and torch.equal(px, cpu.pixels(ims))
    assert torch.equal(dev.images(px, normalize=False), cpu.images(ims, normalize=False))
    grey = [a.convert("L"), c]
    assert torch.equal(dev.pixels(grey), cpu.pixels(grey))


@pytest.mark.parametrize("steps", ["nearest", "max_size", "crop first", "a flip"])
def test_clip_steps_pillow_alone_can_run_stay_with_pillow(models, pics, steps):
    from torchvision import transforms as T

    from mmloom.clip import ClipEmbedder

    e = ClipEmbedder(models[1]["clip"]["model"], resize_on_device=True)
    norm = e.preprocess.transforms[-1]
    e.preprocess = T.Compose({
        "nearest": [T.Resize(64, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(64)],
        "max_size": [T.Resize(64, max_size=100), T.CenterCrop(64)],
        "crop first": [T.CenterCrop(200), T.Resize(64)],
        "a flip": [T.Resize(64), T.CenterCrop(64), T.RandomHorizontalFlip(1.0)],
    }[steps] + [T.ToTensor(), norm])
    assert e._device_steps is None
    ims = [pics["astronaut.jpg"], pics["coffee.jpg"]]
    assert torch.equal(e.inputs(ims), torch.stack([e.preprocess(im) for im in ims]))


@pytest.mark.parametrize("shape", ["no Normalize", "no ToTensor", "a step between ToTensor and Normalize"])
def test_clip_pixels_of_a_transform_of_another_shape_are_its_own_floats(models, pics, shape):
    """Only a pipeline of PIL steps, ToTensor and a final Normalize is cut into uint8 pixels
    and normalization; any other gives its own float tensors, whole."""
    import torch
    from torchvision import transforms as T

    from mmloom.clip import ClipEmbedder

    e = ClipEmbedder(models[1]["clip"]["model"])
    norm = T.Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    e.preprocess = T.Compose({
        "no Normalize": [T.Resize(64), T.CenterCrop(64), T.ToTensor()],
        "no ToTensor": [T.Resize(64), T.CenterCrop(64), T.PILToTensor(), T.ConvertImageDtype(torch.float32), norm],
        "a step between ToTensor and Normalize": [T.Resize(64), T.CenterCrop(64), T.ToTensor(), T.Lambda(lambda x: x * 0.5), norm],
    }[shape])
    ims = [pics["astronaut.jpg"], pics["coffee.jpg"]]
    px = e.pixels(ims)
    assert px.dtype == torch.float32 and torch.equal(px, torch.stack([e.preprocess(im) for im in ims]))
    with torch.no_grad():
        assert torch.equal(e.images(ims, normalize=False), e.model.encode_image(px).float())


@pytest.mark.parametrize("ref", ["ViT-B-32/openai", "hf-hub:nobody/no-such-clip", "/no/such/dir/open_clip"])
def test_missing_clip_is_a_clear_error(ref):
    from mmloom.clip import ClipEmbedder

    with pytest.raises(UserError) as e:
        ClipEmbedder(ref)
    assert ref in str(e.value) and ("not available" in str(e.value) or "expected" in str(e.value))


def test_aesthetic_head_has_laion_layout_and_scale(models):
    from mmloom.filters.aesthetic import AestheticScorer

    root, cfg = models
    a = AestheticScorer(cfg["aesthetic"]["head"], "clip")
    keys = sorted(k for k in a.head.state_dict() if k.endswith("weight"))
    assert keys == ["layers.0.weight", "layers.2.weight", "layers.4.weight", "layers.6.weight", "layers.7.weight"]
    emb = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    s = a(None, emb)
    assert all(1.0 <= v <= 10.0 for v in s)


def test_nsfw_clip_mlp_and_hf_give_probabilities(models, pics):
    from mmloom.filters.hf_classifier import HfImageClassifier
    from mmloom.filters.nsfw import ClipMlpNsfw

    root, cfg = models
    head = ClipMlpNsfw(str(root / "nsfw-head.pt"), "clip")
    p = head(None, torch.nn.functional.normalize(torch.randn(5, 32), dim=-1))
    assert len(p) == 5 and all(0 <= v <= 1 for v in p)
    hf = HfImageClassifier(str(root / "tiny-hf-nsfw"), ["nsfw"], "cpu")
    p = hf([pics["astronaut.jpg"], pics["coffee.jpg"]])
    assert len(p) == 2 and all(0 <= v <= 1 for v in p)
    with pytest.raises(UserError, match="none of its labels"):
        HfImageClassifier(str(root / "tiny-hf-nsfw"), ["porn"], "cpu")


def test_timm_watermark_checkpoint_and_laion_head(models, pics, tmp_path):
    from mmloom.filters.watermark import TimmWatermark, build_timm, save_timm_checkpoint

    root, cfg = models
    w = cfg["watermark"]
    wm = TimmWatermark(w["model"], w["arch"], w["head"], 0, "cpu", 64)
    p = wm([pics["coffee.jpg"], pics["chelsea.jpg"]])
    assert len(p) == 2 and all(0 <= v <= 1 for v in p)
    laion = build_timm("test_efficientnet", "laion")
    head = laion.get_classifier()
    assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == [625, 256, 2]
    save_timm_checkpoint(str(tmp_path / "laion.pt"), "test_efficientnet", "laion")
    assert TimmWatermark(str(tmp_path / "laion.pt"), "test_efficientnet", "laion", 0, "cpu", 64)([pics["coffee.jpg"]])[0] <= 1
    with pytest.raises(UserError, match="does not fit"):
        TimmWatermark(w["model"], "test_efficientnet", "laion", 0, "cpu", 64)


def test_nudenet_real_decisions_and_faces(pics):
    from mmloom.filters.faces import NudeNetFaces, OpenCvFaces
    from mmloom.filters.nsfw import NudeNet, NudeNetNsfw

    nn = NudeNet()
    imgs = [pics["astronaut.jpg"], pics["chelsea.jpg"], pics["brick.jpg"]]
    p = NudeNetNsfw(nn)(imgs)
    assert all(0 <= v < 0.3 for v in p), p  # clothed astronaut, a cat, a wall
    faces = OpenCvFaces()(imgs)
    assert len(faces[0]) == 1 and faces[2] == []
    x0, y0, x1, y1 = faces[0][0]
    assert 100 < x0 < x1 < 400 and 0 < y0 < y1 < 300  # the astronaut's face, upper middle
    assert len(NudeNetFaces(nn)([pics["astronaut.jpg"]])[0]) == 1


def test_phash_groups_near_copies(pics):
    from mmloom.filters.geometry import phash

    a = pics["astronaut.jpg"]
    h1, i1 = phash(a)
    h2, i2 = phash(a.resize((300, 300)))
    h3, i3 = phash(pics["coffee.jpg"])
    dist = lambda x, y: bin((x ^ y) & (2**64 - 1)).count("1")  # noqa: E731
    assert len(h1) == 16 and int(h1, 16) == i1 % 2**64
    assert dist(i1, i2) <= 4 and dist(i1, i3) > 16


@pytest.mark.parametrize("hx, signed", [("0000000000000001", 1), ("7fffffffffffffff", 2**63 - 1),
                                         ("8000000000000000", -(2**63)), ("ffffffffffffffff", -1),
                                         ("0123456789abcdef", 0x0123456789ABCDEF)])
def test_phash_int_is_the_hashs_64_bits_as_a_signed_int64(hx, signed):
    """The int64 column holds the hash's 64 bits in two's complement (DuckDB's bit_count(a # b)
    on the stored column is then the Hamming distance), at both sides of the sign bit, and the
    hex column imagehash's digits of the same bits (row-major, first bit highest)."""
    import numpy as np

    from mmloom.filters.geometry import hash_columns

    bits = np.array([[c == "1" for c in f"{int(hx, 16):064b}"]])
    [(got_hex, got)] = hash_columns(bits)
    assert got_hex == hx and got == signed
    assert int(np.array([got], dtype=np.int64).view(np.uint64)[0]) == int(hx, 16)


def test_batched_phash_is_imagehashs_phash_bit_for_bit(pics):
    """`phashes` runs imagehash.phash's computation on a whole batch (issue 16): the same hex
    digits for photographs of any size, in any mode, and for flat pictures (a median tie)."""
    import imagehash

    from mmloom.filters.geometry import phash, phashes

    base = [pics[k] for k in sorted(pics)]
    ims = base + [im.resize((300, 170)) for im in base[:3]] + [base[0].convert("L"), base[1].convert("RGBA"),
                                                              Image.new("RGB", (50, 50), (10, 20, 30)), Image.new("RGB", (1, 1))]
    got = phashes(ims)
    assert [h for h, _ in got] == [str(imagehash.phash(im)) for im in ims]
    assert got[0] == phash(ims[0]) and phashes([]) == []


def test_phash_with_the_grey_32x32_made_where_the_models_run_is_imagehashs(pics):
    """`PHash(device)` makes the grey 32x32 from the batch's uploaded pictures with Pillow's
    arithmetic (issue 16): the same hashes as imagehash; pictures in other modes than RGB
    keep Pillow's way."""
    import imagehash

    from mmloom.filters.base import Batch
    from mmloom.filters.geometry import PHash, phashes
    from mmloom.pil_resample import upload

    base = [pics[k] for k in sorted(pics)]
    ims = base + [im.resize((300, 170)) for im in base[:3]] + [Image.new("RGB", (50, 50), (10, 20, 30)), Image.new("RGB", (1, 1))]
    want = [str(imagehash.phash(im)) for im in ims]
    assert [h for h, _ in phashes(ims, upload(ims, "cpu"))] == want
    batch = Batch(ims, [""] * len(ims))
    assert PHash("cpu").score(batch)["phash"] == want and ("upload", "cpu") in batch.prepared
    mixed = [base[0].convert("L"), base[1]]
    b2 = Batch(mixed, ["", ""])
    assert PHash("cpu").score(b2)["phash"] == [str(imagehash.phash(im)) for im in mixed] and ("upload", "cpu") not in b2.prepared


def test_geometry_columns_of_a_landscape_and_a_portrait_picture():
    from mmloom.filters.geometry import geometry

    assert geometry(Image.new("RGB", (300, 200))) == {"width": 300, "height": 200, "aspect": 1.5, "area": 60000, "min_side": 200}
    assert geometry(Image.new("RGB", (120, 480))) == {"width": 120, "height": 480, "aspect": 0.25, "area": 57600, "min_side": 120}


def test_geometry_scorer_writes_one_value_per_image_and_column():
    from mmloom.filters.base import Batch
    from mmloom.filters.geometry import Geometry

    out = Geometry().score(Batch([Image.new("RGB", (300, 200)), Image.new("RGB", (120, 480))], ["", ""]))
    assert out == {"width": [300, 120], "height": [200, 480], "aspect": [1.5, 0.25], "area": [60000, 57600], "min_side": [200, 120]}


def test_phash_scorer_writes_the_hex_and_the_int_columns(pics):
    from mmloom.filters.base import Batch
    from mmloom.filters.geometry import PHash, phash

    images = [pics["astronaut.jpg"], pics["coffee.jpg"]]
    out = PHash().score(Batch(images, ["", ""]))
    assert out == {"phash": [phash(im)[0] for im in images], "phash_int": [phash(im)[1] for im in images]}
    assert all(isinstance(h, str) and len(h) == 16 for h in out["phash"])


def test_clip_score_is_each_pictures_cosine_with_its_own_caption(models, pics):
    """The clip score column: cosine of the unit image embedding and the unit embedding of
    the sample's own raw caption (None scores as the empty caption), with the raw image
    norm and both unit embeddings stored beside it."""
    from mmloom.clip import ClipEmbedder
    from mmloom.filters.base import Batch
    from mmloom.filters.clip_score import ClipScore

    ref = models[1]["clip"]["model"]
    e = ClipEmbedder(ref)
    images = [pics["astronaut.jpg"], pics["coffee.jpg"], pics["astronaut.jpg"]]
    captions = ["an astronaut in a white suit", "a cup of coffee", None]
    out = ClipScore(e).score(Batch(images, captions, {ref: e}))
    img, txt = e.images(images), e.texts(["an astronaut in a white suit", "a cup of coffee", ""])
    assert torch.allclose(torch.tensor(out["clip_score"]), (img * txt).sum(-1), atol=1e-5)
    empty = (img * e.texts([""] * 3)).sum(-1)
    assert not torch.allclose(torch.tensor(out["clip_score"][:2]), empty[:2], atol=1e-4)  # the captions count
    assert torch.allclose(torch.tensor(out["clip_text_embedding"]), txt, atol=1e-5)
    assert torch.allclose(torch.tensor(out["clip_image_embedding"]), img, atol=1e-5)
    raw = e.images(images, normalize=False).norm(dim=-1)
    assert torch.allclose(torch.tensor(out["clip_image_norm"]), raw, rtol=1e-5)
    assert set(ClipScore(e, store_embeddings=False).score(Batch(images, captions, {ref: e}))) == {"clip_score"}


def test_scoreset_shares_one_clip_pass(models, pics, monkeypatch):
    from mmloom.curate.config import ScoreConfig
    from mmloom.clip import ClipEmbedder
    from mmloom.filters.scoring import ScoreSet

    root, cfg = models
    cfg = {**cfg, "nsfw": {"backend": "clip_mlp", "model": str(root / "nsfw-head.pt")}}
    s = ScoreSet(ScoreConfig.model_validate(cfg))
    assert len(s.embedders) == 1  # clip score, aesthetic and NSFW head share one model
    calls = []
    orig = ClipEmbedder.images
    monkeypatch.setattr(ClipEmbedder, "images", lambda self, ims, **kw: calls.append(len(ims)) or orig(self, ims, **kw))
    out = s.score([pics["astronaut.jpg"], pics["coffee.jpg"]], ["an astronaut", "<b>coffee</b> http://x.com"])
    assert calls == [2]
    assert out["clean_caption"] == ["an astronaut", "coffee"]
    assert out["aspect"][1] == pytest.approx(1.5) and out["min_side"][1] == 400
    assert all(0 <= v <= 1 for v in out["nsfw"]) and len(out["clip_image_embedding"][0]) == 32


def test_unset_model_is_a_clear_error(models):
    from mmloom.curate.config import ScoreConfig
    from mmloom.filters.scoring import ScoreSet

    cfg = {**models[1], "watermark": {"backend": "hf", "model": None}}
    with pytest.raises(UserError, match="score.watermark.model is not set"):
        ScoreSet(ScoreConfig.model_validate(cfg))


@pytest.mark.parametrize("variant", ["default", "nudenet_faces", "hf+no_embeddings"])
def test_every_scorer_implements_the_protocol(models, pics, variant, monkeypatch):
    """ScoreSet runs each scorer through `filters.base.Scorer`: the columns it declares
    (typed as the scores/ table), their meta and one value per image; nudenet's detector
    runs once per batch however many scorers read it."""
    from mmloom.curate.config import ScoreConfig
    from mmloom.filters.base import Batch, Scorer
    from mmloom.filters.nsfw import NudeNet
    from mmloom.filters.scoring import COLUMN_TYPES, ScoreSet

    root, cfg = models
    cfg = {
        "default": cfg,
        "nudenet_faces": {**cfg, "faces": {"backend": "nudenet"}},
        "hf+no_embeddings": {**cfg, "nsfw": {"backend": "hf", "model": str(root / "tiny-hf-nsfw")},
                             "clip": {"model": cfg["clip"]["model"], "store_embeddings": False}, "phash": False},
    }[variant]
    s = ScoreSet(ScoreConfig.model_validate(cfg))
    imgs = [pics["astronaut.jpg"], pics["coffee.jpg"], pics["brick.jpg"]]
    caps = ["an astronaut", None, "a wall"]
    detect_calls = []
    real_detect = NudeNet.detect_inputs
    monkeypatch.setattr(NudeNet, "detect_inputs", lambda self, ims: detect_calls.append(len(ims)) or real_detect(self, ims))
    batch = Batch(imgs, caps, s.embedders)
    for scorer in s.scorers:
        assert isinstance(scorer, Scorer), type(scorer).__name__
        assert all(COLUMN_TYPES[c] == t for c, t in scorer.columns.items()), type(scorer).__name__
        assert list(scorer.meta) == list(scorer.columns) and all(set(m) == {"model", "version"} for m in scorer.meta.values())
        out = scorer.score(batch)
        assert list(out) == list(scorer.columns) and all(len(v) == len(imgs) for v in out.values())
    assert detect_calls == ([] if variant == "hf+no_embeddings" else [3])  # once for the NSFW score and the faces
    assert s.columns() == [c for c in COLUMN_TYPES if c in s.columns()]  # the table's column order
    assert ("phash" in s.columns()) == (variant != "hf+no_embeddings")
    assert ("clip_image_embedding" in s.columns()) == (variant != "hf+no_embeddings")
    assert s.meta["nsfw"]["model"] == (f"nsfw/hf:{root / 'tiny-hf-nsfw'}" if variant == "hf+no_embeddings" else "nsfw/nudenet:nudenet")
    assert s.meta["face_count"]["model"] == ("faces/nudenet" if variant == "nudenet_faces" else "faces/opencv")


def test_nudenet_batched_in_one_call_finds_what_it_finds_one_image_at_a_time(pics):
    """The score stage runs nudenet's detector on a whole batch in one ONNX call; each
    image's detections are nudenet's own, one image at a time."""
    import numpy as np

    from mmloom.filters.nsfw import NudeNet

    nn = NudeNet()
    imgs = [pics["astronaut.jpg"], pics["chelsea.jpg"], pics["brick.jpg"], pics["coffee.jpg"]]
    own = [nn.detector.detect(np.asarray(im.convert("RGBA"))) for im in imgs]
    calls = []
    real = nn.detector.onnx_session.run
    nn.detector.onnx_session.run = lambda *a, **k: calls.append(1) or real(*a, **k)
    batched = nn.detect(imgs)
    assert len(calls) == 1 and any(own)
    for a, b in zip(own, batched):
        assert [d["class"] for d in a] == [d["class"] for d in b]
        assert [d["box"] for d in a] == [d["box"] for d in b]
        assert np.allclose([d["score"] for d in a], [d["score"] for d in b], atol=1e-5)


@pytest.mark.parametrize("variant", ["default", "hf+nudenet_faces"])
def test_a_prepared_batch_scores_as_the_images_do_and_only_models_run_after(models, pics, variant, monkeypatch):
    """`ScoreSet.prepare` does every batch's CPU work (what a worker thread does ahead of
    the models: pixels, tokens, letterboxes, hashes); scoring the prepared batch gives the same columns as scoring the images,
    and calls no preprocessing again, however many times it is scored."""
    from mmloom.clip import ClipEmbedder
    from mmloom.curate.config import ScoreConfig
    from mmloom.filters import geometry
    from mmloom.filters.nsfw import NudeNet
    from mmloom.filters.scoring import ScoreSet

    root, cfg = models
    if variant != "default":
        cfg = {**cfg, "nsfw": {"backend": "hf", "model": str(root / "tiny-hf-nsfw")}, "faces": {"backend": "nudenet"}}
    s = ScoreSet(ScoreConfig.model_validate(cfg))
    imgs = [pics["astronaut.jpg"], pics["coffee.jpg"], pics["brick.jpg"]]
    caps = ["an astronaut", "<b>coffee</b>", None]
    plain = s.score(imgs, caps)
    batch = s.prepare(imgs, caps)
    cpu_work = []
    for cls, name in ((ClipEmbedder, "pixels"), (ClipEmbedder, "inputs"), (ClipEmbedder, "tokens"), (NudeNet, "inputs")):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, ims, real=real: cpu_work.append(1) or real(self, ims))
    real_phashes = geometry.phashes
    monkeypatch.setattr(geometry, "phashes", lambda ims: cpu_work.append(1) or real_phashes(ims))
    for _ in range(2):  # scoring again runs the models again, on the same prepared inputs
        out = s.score(batch)
        assert list(out) == list(plain) and not cpu_work
        for c in plain:
            if c.endswith("_embedding"):
                assert torch.allclose(torch.tensor(out[c]), torch.tensor(plain[c]), atol=1e-5), c
            elif isinstance(plain[c][0], float):
                assert out[c] == pytest.approx(plain[c], abs=1e-5), c
            else:
                assert out[c] == plain[c], c


def test_opencv_faces_without_a_cascade_names_the_fix(monkeypatch):
    """OpenCV 5 has no CascadeClassifier (seen on a GPU machine's image): the error says
    which pin and which setting, instead of an AttributeError deep in a worker."""
    import sys
    import types

    from mmloom.filters.faces import OpenCvFaces

    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="5.0.0"))
    with pytest.raises(RuntimeError, match=r"OpenCV 5\.0\.0 has no CascadeClassifier.*opencv-python-headless<5.*faces.backend: none"):
        OpenCvFaces()


@pytest.mark.parametrize("backends", [
    {"nsfw": "nudenet", "watermark": "timm", "faces": "opencv", "aesthetic": True},
    {"nsfw": "clip_mlp", "watermark": "hf", "faces": "nudenet", "aesthetic": False},
    {"nsfw": "hf", "watermark": "none", "faces": "none", "aesthetic": True},
    {"nsfw": "none", "watermark": "timm", "faces": "nudenet", "aesthetic": False},
])
def test_score_set_builds_the_scorers_each_backend_names(models, backends):
    """Each config section's backend builds its own scorer, and none builds nothing: the
    scorers, in the scores/ table's order, for every backend of every section."""
    from mmloom.curate.config import ScoreConfig
    from mmloom.filters.heads import save_head
    from mmloom.filters.scoring import ScoreSet

    root, cfg = models
    save_head(str(root / "nsfw-head.pt"), [32, 8, 1])
    nsfw = {"nudenet": {"backend": "nudenet"}, "none": {"backend": "none"},
            "clip_mlp": {"backend": "clip_mlp", "model": str(root / "nsfw-head.pt")},
            "hf": {"backend": "hf", "model": str(root / "tiny-hf-nsfw")}}[backends["nsfw"]]
    watermark = {"timm": cfg["watermark"], "none": {"backend": "none"},
                 "hf": {"backend": "hf", "model": str(root / "tiny-hf-nsfw"), "positive_labels": ["nsfw"]}}[backends["watermark"]]
    s = ScoreSet(ScoreConfig.model_validate({**cfg, "nsfw": nsfw, "watermark": watermark, "faces": {"backend": backends["faces"]},
                                             "aesthetic": {**cfg["aesthetic"], "enabled": backends["aesthetic"]}}))
    names = [type(x).__name__ for x in s.scorers]
    want = ["Geometry", "CaptionCleaner", "ClipScore",
            {"nudenet": "NudeNetNsfw", "clip_mlp": "ClipMlpNsfw", "hf": "HfImageClassifier", "none": None}[backends["nsfw"]],
            {"timm": "TimmWatermark", "hf": "HfImageClassifier", "none": None}[backends["watermark"]],
            "AestheticScorer" if backends["aesthetic"] else None, "PHash",
            {"opencv": "OpenCvFaces", "nudenet": "NudeNetFaces", "none": None}[backends["faces"]]]
    assert names == [n for n in want if n]
    assert ("nsfw" in s.columns()) == (backends["nsfw"] != "none") and ("aesthetic" in s.columns()) == backends["aesthetic"]
    assert (s.nudenet is not None) == ("nudenet" in (backends["nsfw"], backends["faces"]))


def test_inference_autocast_is_bfloat16_on_any_cuda_device_and_off_elsewhere():
    """CLIP and both grounding backends run under `mmloom.models.inference_autocast`: on
    "cuda" or "cuda:N" (a GPU node's index) bfloat16 autocast of the device's type, on the
    CPU none."""
    import warnings

    from mmloom.models import inference_autocast

    for dev in ("cuda", "cuda:1"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # without CUDA torch disables it, warning
            ctx = inference_autocast(dev)
        assert ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    for dev in ("cpu", "cpu:0"):
        with inference_autocast(dev):
            assert not torch.is_autocast_enabled("cpu")


def test_score_device_auto_resolves_and_any_other_is_kept():
    from mmloom.filters.scoring import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("".join(["au", "to"])) == expected  # a string read from a config, not the literal
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu:0") == "cpu:0"
