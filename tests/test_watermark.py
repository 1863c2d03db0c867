"""The timm watermark detector (filters/watermark.py): LAION's preprocessing (a plain
resize to a square, ImageNet normalization) and each image's softmax over the two
classes, whatever else is in the batch."""


import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    from mmloom.filters.watermark import TimmWatermark, save_timm_checkpoint

    path = str(tmp_path_factory.mktemp("wm") / "watermark.pt")
    save_timm_checkpoint(path, "test_efficientnet", "laion")
    return TimmWatermark(path, "test_efficientnet", "laion", 0, "cpu", 64)


def three(pics) -> list:
    return list(pics.values())[:3]


def test_inputs_are_a_square_resize_with_imagenet_normalization(detector, pics):
    im = three(pics)[0]
    x = detector.inputs([im])[0]
    small = im.resize((64, 64), Image.BILINEAR)
    raw = torch.from_numpy(__import__("numpy").asarray(small).copy()).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert x.shape == (3, 64, 64)
    assert torch.allclose(x, (raw - mean) / std, atol=0.05)  # torchvision's antialiased resize vs PIL's: a few levels apart
    assert abs(float(x.mean() - ((raw - mean) / std).mean())) < 0.01


def test_probability_is_each_images_softmax_at_the_positive_class(detector, pics):
    ims = three(pics)
    with torch.no_grad():
        logits = detector.model(detector.inputs(ims)).float()
    want = logits.softmax(-1)[:, 0].tolist()
    assert detector(ims) == pytest.approx(want, abs=1e-6)
    assert [detector([im])[0] for im in ims] == pytest.approx(want, abs=1e-5)  # alone as in a batch
    assert all(0 < p < 1 for p in want)


@pytest.mark.parametrize("head,sizes", [("linear", [2]), ("laion", [625, 256, 2])])
def test_two_classes_with_either_head(head, sizes):
    from mmloom.filters.watermark import build_timm

    classifier = build_timm("test_efficientnet", head).get_classifier()
    linears = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == sizes  # class 0 watermark, class 1 clear


def test_an_unknown_architecture_is_a_clear_error():
    from mmloom.errors import UserError
    from mmloom.filters.watermark import build_timm

    with pytest.raises(UserError, match=r"watermark.arch 'no_such_net' is not a timm architecture"):
        build_timm("no_such_net", "laion")


def test_the_config_asks_for_laions_256_px():
    from mmloom.curate.config import ScoreConfig

    assert ScoreConfig().watermark.image_size == 256
