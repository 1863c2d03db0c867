"""Grounding wrapper: loading through the real transformers path, spans, head boxes."""

import io

import pytest
from PIL import Image

from mmloom.errors import UserError


WORDS = "a man and his dog on the grass".split()


@pytest.fixture(scope="module", params=["transformers", "groundingdino"])
def dino(request, tmp_path_factory):
    """Both backends, each with random weights in its own released format, through
    ``make_detector`` as the ground stage builds them."""
    from mmloom.curate.config import GroundConfig
    from mmloom.filters.grounding import make_detector
    from mmloom.testkit.tiny_scoring import make_grounding_dino, make_original_grounding_dino

    tmp = str(tmp_path_factory.mktemp("dino"))
    if request.param == "transformers":
        cfg = {"backend": "transformers", "model": make_grounding_dino(tmp, WORDS)}
    else:
        cfg = {"backend": "groundingdino", "groundingdino": make_original_grounding_dino(tmp, WORDS)}
    return make_detector(GroundConfig.model_validate({**cfg, "box_threshold": 0.0, "text_threshold": 0.0}))


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
    long = "A Man " * 60  # 360 characters: lengths compared by value (CPython's small ints end at 256)
    assert GroundingDino.prompt_text(long) == long.lower() + "."


def test_a_phrase_span_widens_to_whole_words():
    """A detector's span covers tokens, and a token can be part of a word ("ele" of
    "elephant"): the phrase widens over letters, digits, apostrophes and hyphens on both
    sides, to the caption's start and end, and stops at anything else."""
    from mmloom.filters.grounding import _word_bounds

    cap = "a red-haired man's dog, 2cats"
    assert _word_bounds(cap, 6, 9) == (2, 12)  # "hai" of "red-haired"
    assert _word_bounds(cap, 14, 15) == (13, 18)  # "a" of "man's": over the apostrophe
    assert _word_bounds(cap, 19, 20) == (19, 22) and _word_bounds(cap, 26, 27) == (24, 29)  # stops at ", ", runs to the end
    assert _word_bounds("elephant", 3, 4) == (0, 8) and _word_bounds("elephant", 0, 8) == (0, 8)
    assert _word_bounds("a b", 0, 1) == (0, 1) and _word_bounds("a b", 2, 3) == (2, 3)  # one-letter words stay
    long = "x " * 200 + "elephant"  # 408 characters: positions compared by value (CPython's small ints end at 256)
    assert _word_bounds(long, 403, 404) == (400, 408)


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


def test_original_package_checkpoint_loads_as_released(tmp_path):
    """groundingdino-py's format: ``{"model": state_dict}`` with the package's key names
    (``bert.embeddings...``, ``backbone.0...``, ``transformer...``); a checkpoint of other
    settings is refused naming the file; the detections carry the package's version."""
    import torch

    from mmloom.curate.config import OriginalDinoConfig
    from mmloom.filters.grounding import OriginalGroundingDino
    from mmloom.testkit.tiny_scoring import make_original_grounding_dino

    section = make_original_grounding_dino(str(tmp_path), WORDS)
    state = torch.load(section["weights"], weights_only=True)["model"]
    assert any(k.startswith("bert.embeddings.") for k in state) and any(k.startswith("backbone.0.") for k in state)
    assert any(k.startswith("transformer.decoder.") for k in state)
    d = OriginalGroundingDino(OriginalDinoConfig.model_validate(section), 0.0, 0.0)
    assert d.version.startswith("groundingdino-py 0.4.0")
    for k in ("transformer.decoder.layers.0.linear1.weight",):
        assert torch.equal(d.model.state_dict()[k], state[k])  # loaded, not the random init
    # a checkpoint saved from DistributedDataParallel ("module." before each key) loads the same,
    # as the package's own clean_state_dict reads it
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    ddp = OriginalGroundingDino(OriginalDinoConfig.model_validate({**section, "weights": str(tmp_path / "ddp.pth")}), 0.0, 0.0)
    assert all(torch.equal(v, state[k]) for k, v in ddp.model.state_dict().items() if k in state)
    gone = [k for k in state if k.startswith("transformer.decoder.layers.0.")][:4]
    for k in gone:
        state.pop(k)
    state.update({f"extra.{i}": torch.zeros(1) for i in range(4)})
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(UserError, match="broken.pth does not fit") as e:
        OriginalGroundingDino(OriginalDinoConfig.model_validate({**section, "weights": str(tmp_path / "broken.pth")}), 0.0, 0.0)
    first = ", ".join(sorted(gone, key=list(d.model.state_dict()).index)[:3])  # each list named by its first three
    assert f"4 missing ({first}), 4 unexpected (extra.0, extra.1, extra.2)" in str(e.value)


def test_original_backend_without_its_package_says_how_to_install(monkeypatch):
    """``ground.backend: groundingdino`` without groundingdino-py installed: a UserError that
    names the package and the extra to install, not an ImportError from deep inside."""
    import sys

    from mmloom.curate.config import GroundConfig
    from mmloom.filters.grounding import make_detector

    monkeypatch.setitem(sys.modules, "groundingdino.models", None)  # as if not installed
    with pytest.raises(UserError, match="ground.backend groundingdino needs the groundingdino-py package .*pip install 'mmloom\\[groundingdino\\]'"):
        make_detector(GroundConfig.model_validate({"backend": "groundingdino"}))



def test_a_batch_prepared_in_a_worker_thread_gives_the_same_boxes(dino):
    """`prepare` (the processor's work) may run in a worker thread ahead of the model, as
    the ground stage does with the model on a GPU: the boxes are the ones of `detect`."""
    from concurrent.futures import ThreadPoolExecutor

    caps = ["a man and his dog", "his dog on the grass", "the grass"]
    ims = [Image.new("RGB", (320, 200), "red"), Image.new("RGB", (256, 256), "green"), Image.new("RGB", (200, 300), "blue")]
    with ThreadPoolExecutor(1) as ex:
        prep = ex.submit(dino.prepare, ims, caps).result()
    assert dino.detect(ims, caps, prep) == dino.detect(ims, caps)


def _detect_chosen(dino, monkeypatch, cap, box_threshold, text_threshold, queries, boxes, size):
    """`GroundingDino.detect` on one picture of ``size`` with ``cap`` whose model output is
    chosen: ``queries``, one {prompt token's text, or token index: probability} per query
    (every other probability 0), and each query's box (normalized cx cy w h)."""
    import torch

    monkeypatch.setattr(dino, "box_threshold", box_threshold)
    monkeypatch.setattr(dino, "text_threshold", text_threshold)
    text = dino.prompt_text(cap)
    offsets = dino.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    tok = {text[s:e]: t for t, (s, e) in enumerate(offsets) if e > s}
    probs = torch.zeros(1, len(queries), len(offsets))
    for q, chosen in enumerate(queries):
        for k, v in chosen.items():
            probs[0, q, k if isinstance(k, int) else tok[k]] = v
    out = (probs, torch.tensor([boxes]))
    monkeypatch.setattr(dino, "_forward", lambda texts, inputs: out)
    [dets] = dino.detect([Image.new("RGB", size)], [cap], {"texts": [text], "offsets": [offsets], "inputs": None})
    return dets


def test_output_decoding_thresholds_spans_and_boxes(dino, monkeypatch):
    """`GroundingDino.detect`'s reading of the model's output, on chosen probabilities: a
    box needs a caption token at or over box_threshold (compared in float32, as torch did:
    float32(0.35) is under 0.35), the phrase grows over neighbouring caption tokens over
    text_threshold, special tokens never count, boxes go from normalized cx cy w h to
    pixels, and boxes under a pixel are dropped."""
    import numpy as np

    queries = [{"man": 0.9, "and": 0.3, "a": 0.2},  # "man and"
               {"dog": 0.3},  # under box_threshold
               {0: 0.99},  # a special token only
               {"dog": 0.8},  # a box 0.2 px wide
               {"his": float(np.float32(0.35))},  # the threshold in float32: under 0.35
               {"his": 0.6, "dog": 0.25}]  # "his" alone: 0.25 is not over 0.25
    boxes = [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2],
             [0.5, 0.5, 0.001, 0.5], [0.5, 0.5, 0.2, 0.2], [0.1, 0.9, 0.4, 0.4]]
    assert _detect_chosen(dino, monkeypatch, "a man and his dog", 0.35, 0.25, queries, boxes, (200, 100)) == [
        {"phrase": "man and", "span": [2, 9], "box": [50.0, 25.0, 150.0, 75.0], "score": 0.9, "text_score": 0.6},
        {"phrase": "his", "span": [10, 13], "box": [0.0, 70.0, 60.0, 100.0], "score": 0.6, "text_score": 0.6},
    ]


def test_phrases_grow_over_neighbours_and_boxes_keep_a_tenth_of_a_pixel(dino, monkeypatch):
    """More of `detect`'s decoding, on chosen probabilities: a box exactly at box_threshold
    (0.5, exact in float32) is kept; the phrase grows left and right one token at a time while
    the neighbour is a caption token over text_threshold, up to the caption's last word and
    never into the prompt's closing period; boxes one pixel wide or high are kept, corners are
    clipped to the picture, scores keep four decimals and corners one."""
    W, H = 256, 128
    queries = [{"a": 0.2, "man": 0.3, "and": 0.5},  # "man and", at the threshold
               {"his": 0.3, "dog": 0.912345, ".": 0.9},  # "his dog", not "."
               {"man": 0.7},  # a box one pixel wide
               {"man": 0.7},  # a box one pixel high
               {"and": 0.6, "his": 0.4}]  # "and his", text score their mean
    boxes = [[0.5, 0.5, 0.4, 0.4], [0.123, 0.4, 0.3, 0.79], [0.5, 0.5, 1 / W, 0.5], [0.5, 0.5, 0.5, 1 / H], [0.9, 0.1, 0.4, 0.4]]
    assert _detect_chosen(dino, monkeypatch, "a man and his dog", 0.5, 0.25, queries, boxes, (W, H)) == [
        {"phrase": "man and", "span": [2, 9], "box": [76.8, 38.4, 179.2, 89.6], "score": 0.5, "text_score": 0.4},
        {"phrase": "his dog", "span": [10, 17], "box": [0.0, 0.6, 69.9, 101.8], "score": 0.9123, "text_score": 0.6062},
        {"phrase": "man", "span": [2, 5], "box": [127.5, 32.0, 128.5, 96.0], "score": 0.7, "text_score": 0.7},
        {"phrase": "man", "span": [2, 5], "box": [64.0, 63.5, 192.0, 64.5], "score": 0.7, "text_score": 0.7},
        {"phrase": "and his", "span": [6, 13], "box": [179.2, 0.0, 256, 38.4], "score": 0.6, "text_score": 0.5},
    ]


def test_punctuation_and_neighbours_at_the_text_threshold_stay_out_of_phrases(dino, monkeypatch):
    """A comma inside the caption is its own token and never part of a phrase, however
    likely; a neighbour exactly at text_threshold (0.25, exact in float32) stays out; a box
    under a pixel high is dropped."""
    queries = [{"man": 0.9, ",": 0.8, "and": 0.3}, {"and": 0.25, "his": 0.9},
               {"dog": 0.9}]  # a box 0.5 px high: dropped
    boxes = [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.005]]
    dets = _detect_chosen(dino, monkeypatch, "a man, and his dog", 0.35, 0.25, queries, boxes, (100, 100))
    assert [(d["phrase"], d["span"]) for d in dets] == [("man", [2, 5]), ("his", [11, 14])]


def test_head_box_is_the_largest_face_raised_widened_clipped_and_in_picture_pixels():
    """`HeadFinder`'s geometry on chosen face boxes (the cascade's own output is tested in
    test_faces.py): the person box is rounded to pixels and cropped; of the faces in the crop
    the largest by area is kept; its head box is a square `head_expand` times the face's longer
    side, centred a tenth of the face's height above the face's centre (hair), clipped to the
    person box and moved back into the picture's pixels (a tenth of a pixel). A person box
    under 8 pixels either way, or one without a face, has no head."""
    from mmloom.filters.grounding import HeadFinder

    img = Image.new("RGB", (400, 400))
    finder = HeadFinder("".join(["fa", "ce"]), 1.8)  # built at run time, not the literal's object: compared by value
    assert finder.version.endswith("haarcascade_frontalface_default")  # OpenCV's cascade
    seen = []

    def faces(crops, found):
        seen.extend(c.size for c in crops)
        return [found]

    person = [100.4, 50.6, 300.2, 350.0]  # pixels 100, 51, 300, 350: a crop of 200 x 299
    finder.faces = lambda crops: faces(crops, [[10, 10, 20, 20], [60, 80, 100, 130], [0, 0, 30, 30]])
    # the 40 x 50 face: centre (80, 105) raised by 5, half side 1.8 * 50 / 2 = 45
    assert finder(img, person) == [135.0, 106.0, 225.0, 196.0] and seen == [(200, 299)]
    # the largest by area (1092), where every swap of the corner arithmetic the faces above left open picks another face
    finder.faces = lambda crops: faces(crops, [[82, 42, 103, 88], [25, 231, 46, 257], [77, 111, 116, 139], [128, 160, 163, 191]])
    # the 39 x 28 face: centre (96.5, 125) raised by 2.8, half side 1.8 * 39 / 2 = 35.1
    assert finder(img, person) == [161.4, 138.1, 231.6, 208.3]
    finder.expand = 1.75  # half side 34.125: each corner rounded to a tenth of a pixel
    assert finder(img, person) == [162.4, 139.1, 230.6, 207.3]
    finder.expand = 1.8
    finder.faces = lambda crops: faces(crops, [[0, 0, 40, 40]])  # half side 36 around (20, 16): clipped at the top left
    assert finder(img, person) == [100.0, 51.0, 156.0, 103.0]
    finder.faces = lambda crops: faces(crops, [[180, 270, 200, 299]])  # half 26.1 around (190, 281.6): clipped at the bottom right
    assert finder(img, person) == [263.9, 306.5, 300.0, 350.0]
    finder.expand = 1.0  # the face's own square, raised
    finder.faces = lambda crops: faces(crops, [[60, 80, 100, 130]])
    assert finder(img, person) == [155.0, 126.0, 205.0, 176.0]
    finder.faces = lambda crops: faces(crops, [])
    assert finder(img, person) is None
    finder.faces = lambda crops: faces(crops, [[0, 0, 4, 4]])
    seen.clear()
    assert finder(img, [10, 10, 17, 60]) is None and finder(img, [10, 10, 60, 17]) is None and seen == []  # 7 px: never looked at
    assert finder(img, [10, 10, 18, 18]) == [10.0, 10.0, 14.0, 13.6] and seen == [(8, 8)]  # 8 px: looked at


def test_head_box_from_the_detector_is_its_best_scored_head_box():
    """``head_source: detector``: the grounding model is asked for "head" inside the person
    crop, and its best-scored box (clipped to the crop, in picture pixels) is the head."""
    from mmloom.filters.grounding import HeadFinder

    asked = []

    class Detector:
        ref = "tiny-dino"

        def detect(self, crops, captions):
            asked.append(([c.size for c in crops], captions))
            return [[{"box": [1.0, 2.0, 30.0, 40.0], "score": 0.3}, {"box": [5.0, 6.0, 50.0, 400.0], "score": 0.9},
                     {"box": [0.0, 0.0, 10.0, 10.0], "score": 0.5}]]

    finder = HeadFinder("".join(["detect", "or"]), 1.8, Detector())  # built at run time: compared by value
    assert finder.version == "tiny-dino prompted with 'head'"
    assert finder(Image.new("RGB", (400, 400)), [100, 50, 300, 350]) == [105.0, 56.0, 150.0, 350.0]
    assert asked == [([(200, 300)], ["head"])]
    Detector.detect = lambda self, crops, captions: [[]]
    assert finder(Image.new("RGB", (400, 400)), [100, 50, 300, 350]) is None
    nothing = HeadFinder("detector", 1.8, None)
    assert nothing.version == "none" and nothing(Image.new("RGB", (400, 400)), [100, 50, 300, 350]) is None


@pytest.mark.parametrize("size", [(400, 300), (300, 400), (2000, 500), (500, 2000), (800, 600), (1333, 10), (5000, 3),
                                  (799, 801), (123, 457), (900, 500), (500, 900)])
def test_original_backend_feeds_the_model_what_the_packages_inference_does(size):
    """``ground.backend: groundingdino`` resizes and normalizes each picture exactly as the
    package's own inference (``groundingdino.util.inference.load_image``: ``RandomResize([800],
    max_size=1333)``, ``ToTensor``, ``Normalize`` with ImageNet's mean and deviation), pixel
    for pixel: the same sizes (the longer side truncated, as the package computes it) and
    the same values, including pictures whose longer side would pass max_size."""
    import groundingdino.datasets.transforms as T
    import numpy as np
    import torch

    from mmloom.curate.config import OriginalDinoConfig
    from mmloom.filters.grounding import OriginalGroundingDino

    rng = np.random.default_rng(sum(size))
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    package = T.Compose([T.RandomResize([800], max_size=1333), T.ToTensor(),
                         T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    want, _ = package(im, None)
    detector = object.__new__(OriginalGroundingDino)  # _inputs reads only the section's sizes
    detector.section = OriginalDinoConfig.model_validate({"image_size": 800, "max_size": 1333})
    [got] = detector._inputs([im], ["a dog."])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_original_backend_keeps_a_pixel_where_the_package_would_fail():
    """A picture over 2,666 times as wide as high: the package's resize asks for a 0-pixel
    side and fails (ValueError); mmloom keeps one pixel each way."""
    import groundingdino.datasets.transforms as T

    from mmloom.curate.config import OriginalDinoConfig
    from mmloom.filters.grounding import OriginalGroundingDino

    im = Image.new("RGB", (3000, 1))
    with pytest.raises(ValueError):
        T.RandomResize([800], max_size=1333)(im, None)
    detector = object.__new__(OriginalGroundingDino)
    detector.section = OriginalDinoConfig.model_validate({})
    assert [tuple(t.shape) for t in detector._inputs([im, Image.new("RGB", (2600, 1))], ["a.", "b."])] == [(3, 1, 1), (3, 1, 2600)]


def test_bert_wrapper_masks_as_the_package_does():
    """``_Bert`` (groundingdino-py's BertModelWarper for transformers 5): with a [B, T] mask
    it is BERT itself; with the package's [B, T, T] block-diagonal mask a token sees only
    its own phrase's block, so changing another block's tokens leaves it unchanged, while
    changing its own block does not."""
    import torch
    from transformers import BertConfig, BertModel

    from mmloom.filters.grounding import _Bert

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                     add_pooling_layer=False).eval()
    wrapped = _Bert(bert)
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = wrapped(ids, mask)
        torch.testing.assert_close(out["last_hidden_state"], bert(ids, attention_mask=mask).last_hidden_state)
        assert out["pooler_output"] is None
        blocks = torch.zeros(2, 6, 6)
        blocks[:, :3, :3] = blocks[:, 3:, 3:] = 1  # two phrases: tokens 0-2 and 3-5
        first = wrapped(ids, blocks)["last_hidden_state"]
        other = ids.clone()
        other[:, 3:] = (other[:, 3:] + 7) % 50
        second = wrapped(other, blocks)["last_hidden_state"]
        torch.testing.assert_close(first[:, :3], second[:, :3])  # the first phrase never saw the second
        assert (first[:, 3:] - second[:, 3:]).abs().max() > 1e-3
        assert (first - wrapped(ids, mask)["last_hidden_state"]).abs().max() > 1e-3  # the blocks are applied
