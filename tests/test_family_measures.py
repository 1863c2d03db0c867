"""The family measures of `mmloom eval` (issue 17 item 3) on constructed pictures: each
gives the figure a right answer must give, and a wrong picture gives another."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mmloom.testkit.toyworld import COLOURS, draw_object
from mmloom.train import eval as ev

SIZE = 64


def picture(objects: list[tuple[str, str]], size: int = SIZE) -> Image.Image:
    """Objects side by side, left to right, on a grey background (the toy world's layout)."""
    img = Image.new("RGB", (size, size), (128, 124, 120))
    d = ImageDraw.Draw(img)
    w = size // len(objects)
    for k, (colour, shape) in enumerate(objects):
        m = w // 8
        draw_object(d, shape, (k * w + m, size // 4, (k + 1) * w - m, size // 4 + w - 2 * m), COLOURS[colour])
    return img


def boxes(objects, size: int = SIZE):
    w = size // len(objects)
    return [(k * w + w // 8, size // 4, (k + 1) * w - w // 8, size // 4 + w - w // 4) for k in range(len(objects))]


RED = [("red", "circle"), ("red", "square")]
BLUE = [("blue", "circle"), ("blue", "square")]


def test_mix_fractions_read_which_context_the_colours_came_from():
    """Text says red, image shows blue: a red picture is all text, a blue one all image; the
    fraction rising with the mixing rate is what "moves with the rate" checks."""
    red, blue = picture(RED), picture(BLUE)
    assert ev.mix_fractions([red], [RED], [BLUE]) == {"text": 1.0, "image": 0.0, "objects": 2}
    assert ev.mix_fractions([blue], [RED], [BLUE]) == {"text": 0.0, "image": 1.0, "objects": 2}
    half = picture([("red", "circle"), ("blue", "square")])
    assert ev.mix_fractions([half], [RED], [BLUE]) == {"text": 0.5, "image": 0.5, "objects": 2}
    # objects of the same colour in text and image say nothing about the mix: not counted
    assert ev.mix_fractions([red], [RED], [[("red", "star"), ("blue", "star")]])["objects"] == 1
    assert ev.rises([0.0, 0.5, 0.5, 1.0]) and not ev.rises([0.0, 1.0, 0.5])


def test_colour_preservation_against_own_and_other_source():
    var = picture(RED)
    assert ev.colour_preservation([var], [RED]) == 1.0
    assert ev.colour_preservation([var], [BLUE]) == 0.0
    assert ev.colour_preservation([var], [[("red", "star"), ("green", "star")]]) == 0.5


def test_prior_agreement_cosine_and_retrieval():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(6, 16, generator=g)
    perm = ev.derangement(6)
    right = ev.prior_agreement(true * 3.0, true, perm)
    assert right["cosine"] == pytest.approx(1.0) and right["retrieval"] == 1.0 and right["cosine_shuffled"] < 0.9
    wrong = ev.prior_agreement(true[perm], true, perm)
    assert wrong["retrieval"] == 0.0 and wrong["cosine_shuffled"] == pytest.approx(1.0)


def test_restoration_measures_see_masked_error_unmasked_changes_and_object_colours():
    truth = picture(RED)
    bx = boxes(RED)
    (mask,) = ev.restore_masks([bx], SIZE, 8, extra=1)
    per_object = [ev.restore_masks([[b]], SIZE, 8, extra=0)[0] for b in bx]
    assert mask.sum() >= 2 * 64 and all((mask & m).sum() == 64 for m in per_object)  # a patch on each object centre
    perfect = ev.restoration_errors([truth], [truth], [mask])
    assert perfect == {"masked_error": 0.0, "unmasked_max_difference": 0}
    mean = ev.fill(truth, np.asarray(truth)[~mask].mean(0).round(), mask)
    assert ev.restoration_errors([mean], [truth], [mask])["masked_error"] > 0.05
    assert ev.objects_restored([truth], [per_object], [["red", "red"]]) == 1.0
    assert ev.objects_restored([mean], [per_object], [["red", "red"]]) == 0.0
    assert ev.objects_restored([ev.fill(truth, picture(BLUE), mask)], [per_object], [["red", "red"]]) == 0.0
    moved = np.asarray(truth).copy()
    moved[0, 0] = 255  # one unmasked pixel changed
    assert not mask[0, 0] and ev.restoration_errors([Image.fromarray(moved)], [truth], [mask])["unmasked_max_difference"] > 100


def test_label_accuracy_reads_the_leftmost_object():
    im = picture([("red", "circle"), ("blue", "star")])
    assert ev.label_accuracy([im], ["red circle"]) == {"colour": 1.0, "shape": 1.0, "both": 1.0}
    assert ev.label_accuracy([im], ["blue circle"]) == {"colour": 0.0, "shape": 1.0, "both": 0.0}
    assert ev.label_accuracy([im], ["blue star"])["both"] == 0.0  # the right-hand object is not the labelled one
    assert ev.label_accuracy([im], ["other"])["both"] == 0.0


def test_a_prompt_names_a_multi_word_label():
    """MT-Diffusion image_label: the toy world's labels are phrases ("red circle"); a prompt
    naming one must give that class (the old word-by-word match never found a phrase)."""
    from mmloom.train.families.mtdiffusion import label_in

    classes = ["other", "circle", "red circle", "blue circle"]
    assert label_in("a red circle beside a blue star", classes) == 2
    assert label_in("A Blue  Circle", classes) == 3
    assert label_in("a circle", classes) == 1
    assert label_in("a reddish circles", classes) is None
    # a tie in length goes to the class listed first, wherever the prompt names it
    ties = ["other", "cat", "dog", "cow"]
    assert label_in("a cow and a dog", ties) == 2 and label_in("a cow, a dog and a cat", ties) == 1


def test_mtdiffusion_returns_the_labels_it_generates_and_the_ones_it_is_given(tiny_cache):
    """Joint label accuracy reads the label MT-Diffusion generates with each picture: a
    prompt naming a label gives that label back (with its picture), an empty prompt one of
    the classes the head estimated."""
    from mmloom.errors import UserError
    from mmloom.train.config import TrainConfig
    from mmloom.train.families import get_family

    def build(task):
        mc = {"task": task, "backbone": {"path": "tiny:unet", "subfolder": None}, "autoencoder": {"path": "tiny:vae", "subfolder": None},
              "labels": ["red circle", "blue star"], "schedule": {"num_train_timesteps": 4}}
        cfg = TrainConfig.model_validate({"family": "mtdiffusion", "model": mc, "data": {"resolution": 32}})
        return get_family("mtdiffusion").build(cfg.model, cfg).eval()

    model = build("image_label")
    images, labels = model.generate([["a red circle beside a blue star"], [""]], seeds=[0, 1], size=32, return_labels=True)
    assert len(images) == 2 and images[0].size == (32, 32)
    assert labels[0] == "red circle" and labels[1] in ("other", "red circle", "blue star")
    with pytest.raises(UserError, match="image_label"):
        build("masked_image").generate([[""]], size=32, return_labels=True)
