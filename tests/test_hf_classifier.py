"""A Hugging Face image classifier as a probability (filters/hf_classifier.py): each
image's softmax over its own labels, summed over the labels that match, whatever else is
in the batch."""


import pytest
import torch


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from mmloom.testkit.tiny_scoring import make_hf_classifier

    return make_hf_classifier(str(tmp_path_factory.mktemp("hf") / "tiny-cls"), ["normal", "nsfw", "porn", "sexy"])


def three(pics) -> list:
    return list(pics.values())[:3]


def test_probability_is_each_images_softmax_summed_over_matching_labels(classifier_dir, pics):
    from mmloom.filters.hf_classifier import HfImageClassifier

    c = HfImageClassifier(classifier_dir, ["nsfw", "^porn$"], "cpu")
    assert sorted(c.model.config.id2label[i] for i in c.positive) == ["nsfw", "porn"]
    ims = three(pics)
    with torch.no_grad():
        logits = c.model(**c.inputs(ims)).logits.float()
    want = logits.softmax(-1)[:, c.positive].sum(-1).tolist()
    assert c(ims) == pytest.approx(want, abs=1e-6)
    alone = [c([im])[0] for im in ims]  # a batch of one: the same probability
    assert alone == pytest.approx(want, abs=1e-5)
    assert all(0 < p < 1 for p in want)
