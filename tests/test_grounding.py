"""Grounding wrapper: loading through the real transformers path, spans, head boxes."""

import io

import pytest
from PIL import Image

from mmloom.errors import UserError


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    from mmloom.filters.grounding import GroundingDino
    from mmloom.testkit.tiny_scoring import make_grounding_dino

    path = make_grounding_dino(str(tmp_path_factory.mktemp("dino")), "a man and his dog on the grass".split())
    return GroundingDino(path, box_threshold=0.0, text_threshold=0.0)


def test_batched_detection_spans_and_boxes(dino):
    caps = ["a man and his dog", "his dog on the grass"]
    ims = [Image.new("RGB", (320, 200), "red"), Image.new("RGB", (256, 256), "green")]
    out = dino.detect(ims, caps)
    assert len(out) == 2 and all(out)
    for cap, im, dets in zip(caps, ims, out):
        for d in dets:
            s, e = d["span"]
            assert cap[s:e] == d["phrase"] and d["phrase"].strip() == d["phrase"]
            assert (s == 0 or not cap[s - 1].isalnum()) and (e == len(cap) or not cap[e].isalnum())  # whole words
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 < x1 <= im.size[0] and 0 <= y0 < y1 <= im.size[1]
            assert 0 <= d["score"] <= 1
    # batching does not change results: one image at a time gives the same boxes
    alone = dino.detect(ims[:1], caps[:1])[0]
    assert [d["span"] for d in alone] == [d["span"] for d in out[0]]


def test_prompt_text_keeps_offsets():
    from mmloom.filters.grounding import GroundingDino

    assert GroundingDino.prompt_text("A Man") == "a man."
    assert GroundingDino.prompt_text("a dog.") == "a dog."
    weird = "\u0130stanbul"  # lowercasing changes the length: keep the caption as it is
    assert GroundingDino.prompt_text(weird)[:-1] == weird


def test_missing_grounding_model_is_a_clear_error():
    from mmloom.filters.grounding import GroundingDino

    with pytest.raises(UserError, match="IDEA-Research/grounding-dino-tiny.*not available"):
        GroundingDino("IDEA-Research/grounding-dino-tiny", 0.35, 0.25)


def test_head_box_inside_person_box_from_face_detector(images):
    from mmloom.filters.grounding import HeadFinder, is_person

    img = Image.open(io.BytesIO(dict((n, d) for n, d, *_ in images)["astronaut.jpg"])).convert("RGB")
    person = [60, 0, 460, 512]
    head = HeadFinder("face", 1.8)(img, person)
    assert head is not None
    assert person[0] <= head[0] < head[2] <= person[2] and person[1] <= head[1] < head[3] <= person[3]
    assert 150 < (head[0] + head[2]) / 2 < 300 and (head[1] + head[3]) / 2 < 200  # around her face
    assert HeadFinder("face", 1.8)(img, [0, 400, 100, 512]) is None  # no face in that corner
    assert is_person("a woman astronaut", ["woman"]) and not is_person("a womanly dog", ["woman"])
