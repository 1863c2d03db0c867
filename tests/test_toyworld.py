"""The toy world: its analyzer (a check that does not learn), the supplied-boxes grounding
backend (hostile metadata), and the toy world curated end to end by the real stages."""

import json

import numpy as np
import pytest
from PIL import Image

from mmloom.testkit.toyworld import COLOURS, SHAPES, parse_caption, render_scene, scene_boxes
from mmloom.train.analyze import adherence, find_objects


def _expected(scene):
    return [(o.colour, o.shape) for o in scene.objects]


@pytest.mark.parametrize("res", [64, 32])
def test_analyzer_recognises_rendered_objects(res):
    """At the training resolutions the analyzer finds colour and shape of nearly every object."""
    scores = [adherence(render_scene(seed, size=128).image.resize((res, res), Image.BICUBIC), _expected(render_scene(seed, size=128)))
              for seed in range(40)]
    assert np.mean([s["colour"] for s in scores]) == 1.0
    assert np.mean([s["both"] for s in scores]) >= 0.95


def test_analyzer_tells_each_colour_and_shape_apart():
    """Every colour x shape, drawn alone at 64 px, is named right (no confusion between two kinds)."""
    from PIL import ImageDraw

    from mmloom.testkit.toyworld import draw_object

    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            img = Image.new("RGB", (64, 64), (120, 118, 125))
            draw_object(ImageDraw.Draw(img), shape, (8, 10, 36, 38), rgb)
            (found,) = find_objects(img, regions=1)
            assert (found.colour, found.shape) == (colour, shape)


def test_analyzer_finds_nothing_in_noise_or_blank_pictures():
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(30)]  # white noise
    pictures += [np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC))
                 for _ in range(30)]  # smooth coloured noise
    pictures += [np.full((64, 64, 3), 128, np.uint8)]
    found = [f for p in pictures for f in find_objects(p) if f is not None and f.shape is not None]
    assert len(found) <= 2, found  # of 122 strips
    expected = [(c, s) for c, s in zip(list(COLOURS) * 2, SHAPES)][:2]
    assert np.mean([adherence(p, expected)["both"] for p in pictures]) < 0.02


def test_captions_name_objects_left_to_right():
    s = render_scene(3)
    assert parse_caption(s.caption) == _expected(s)
    assert [o.box[0] for o in s.objects] == sorted(o.box[0] for o in s.objects)
    for o in s.objects:
        x0, y0, x1, y1 = o.box
        assert (x1 - x0) * (y1 - y0) >= 150 * 150  # the crop rules keep every object
    assert render_scene(3).caption == s.caption and np.array_equal(np.asarray(render_scene(3).image), np.asarray(s.image))


# ---------------------------------------------------------------- supplied boxes (hostile input)
def test_supplied_boxes_become_detections_in_the_downloaded_pictures_pixels():
    from mmloom.filters.grounding import SuppliedBoxes

    cap = "a red circle beside a red circle"
    recs = [{"phrase": "red circle", "box": [0, 0, 200, 100]}, {"phrase": "Red  Circle", "box": [300, 100, 500, 400]}]
    for value in (recs, json.dumps(recs), json.dumps(recs).encode()):
        found, why = SuppliedBoxes().detect(value, cap, (1000, 500), (512, 256))
        assert why == {}
        assert [f["span"] for f in found] == [[2, 12], [22, 32]]  # k-th record of a phrase: its k-th occurrence
        assert [cap[s:e] for s, e in (f["span"] for f in found)] == ["red circle", "red circle"]
        assert found[0]["box"] == [0.0, 0.0, 102.4, 51.2] and found[1]["box"] == [153.6, 51.2, 256.0, 204.8]
        assert all(f["score"] == f["text_score"] == 1.0 for f in found)  # given, not guessed


@pytest.mark.parametrize("value, reason", [
    (None, "no_boxes"),
    ("not json", "boxes_not_json"),
    ("[" * 100000, "boxes_too_long"),
    ("[" * 5000 + "]" * 5000, None),  # deep nesting: refused, never a crash
    ({"phrase": "red circle"}, "boxes_not_a_list"),
    ([{"phrase": "red circle", "box": [0, 0, 10, 10]}] * 65, "too_many_boxes"),
    ([{"phrase": 3, "box": [0, 0, 10, 10]}], "bad_phrase"),
    ([{"phrase": "x" * 1000, "box": [0, 0, 10, 10]}], "bad_phrase"),
    ([["red circle", [0, 0, 10, 10]]], "bad_phrase"),
    ([{"phrase": "red circle", "box": [0, 0, 10]}], "bad_box"),
    ([{"phrase": "red circle", "box": [0, 0, 10, 10, 10]}], "bad_box"),
    ([{"phrase": "red circle", "box": [0, 0, "10", 10]}], "bad_box"),
    ([{"phrase": "red circle", "box": [0, 0, float("nan"), 10]}], "bad_box"),
    ([{"phrase": "red circle", "box": [0, 0, True, 10]}], "bad_box"),
    ([{"phrase": "red circle", "box": [10, 0, 5, 10]}], "box_out_of_bounds"),
    ([{"phrase": "red circle", "box": [-5, 0, 10, 10]}], "box_out_of_bounds"),
    ([{"phrase": "red circle", "box": [0, 0, 10, 1e9]}], "box_out_of_bounds"),
    ([{"phrase": "blue star", "box": [0, 0, 10, 10]}], "phrase_not_in_caption"),
    ([{"phrase": "red circ", "box": [0, 0, 10, 10]}], "phrase_not_in_caption"),  # whole words only
])
def test_supplied_boxes_refuse_hostile_values_and_count_why(value, reason):
    from mmloom.filters.grounding import SuppliedBoxes

    found, why = SuppliedBoxes(max_boxes=64).detect(value, "a red circle beside a red circle", (100, 100), (100, 100))
    if reason is None:
        assert found == [] and sum(why.values()) == 1
    else:
        assert why == {reason: 1} and found == []  # refused once, by that reason alone


def test_supplied_boxes_defaults_bound_the_value_and_each_phrase():
    """Unless told otherwise: 64 records (``ground.max_boxes``' default), 64 KiB of JSON
    text and 200 characters per phrase (the ground stage passes only ``max_boxes``, so
    these two are the bounds every hostile value meets); the tests above show each bound
    is the one applied."""
    from mmloom.curate.config import GroundConfig
    from mmloom.filters.grounding import SuppliedBoxes

    b = SuppliedBoxes()
    assert (b.max_boxes, b.max_bytes, b.max_phrase) == (64, 65536, 200) and GroundConfig().max_boxes == 64


def test_supplied_boxes_refuse_each_bad_record_and_keep_reading():
    """A refused record is counted once and the records after it are still read; the
    limits are inclusive (a value of exactly max_bytes or max_boxes is read; a box may end
    one pixel past the original's edge), and boxes keep a tenth of a pixel."""
    import json

    from mmloom.filters.grounding import SuppliedBoxes

    cap = "a red circle beside a red circle"
    good = {"phrase": "red circle", "box": [3, 1, 9, 7]}
    bad = [{"phrase": "", "box": [0, 0, 1, 1]}, {"phrase": "red circle", "box": [0, 0, 1]},
           {"phrase": "red circle", "box": [0, 0, 1500, 1]}, {"phrase": "blue star", "box": [0, 0, 1, 1]}]
    found, why = SuppliedBoxes().detect([*bad, good], cap, (1000, 500), (512, 256))
    assert why == {"bad_phrase": 1, "bad_box": 1, "box_out_of_bounds": 1, "phrase_not_in_caption": 1}
    assert len(found) == 1 and found[0]["span"] == [2, 12] and found[0]["box"] == [1.5, 0.5, 4.6, 3.6]
    found, why = SuppliedBoxes().detect([good] * 3, cap, (100, 100), (100, 100))  # two occurrences, three records
    assert why == {"phrase_not_in_caption": 1} and [f["span"] for f in found] == [[2, 12], [22, 32]]
    text = json.dumps([good] * 2)
    assert SuppliedBoxes(max_bytes=len(text)).detect(text, cap, (100, 100), (100, 100))[1] == {}
    assert SuppliedBoxes(max_bytes=len(text) - 1).detect(text, cap, (100, 100), (100, 100))[1] == {"boxes_too_long": 1}
    assert SuppliedBoxes(max_boxes=2).detect([good] * 2, cap, (100, 100), (100, 100))[1] == {}
    assert SuppliedBoxes(max_phrase=10).detect([good], cap, (100, 100), (100, 100))[1] == {}  # "red circle": 10
    assert SuppliedBoxes(max_phrase=9).detect([good], cap, (100, 100), (100, 100))[1] == {"bad_phrase": 1}
    assert SuppliedBoxes(max_boxes=1).detect([good] * 2, cap, (100, 100), (100, 100))[1] == {"too_many_boxes": 1}
    ow, oh = 100, 50.5  # a box ends at most one pixel past the edge, on either axis
    for box, ok in (([0, 0, ow + 1, oh + 1], True), ([0, 0, ow + 1.5, 10], False), ([0, 0, 10, oh + 1.5], False),
                    ([-0.5, 0, 10, 10], False), ([0, -0.5, 10, 10], False), ([5, 0, 5, 10], False), ([0, 5, 10, 5], False),
                    ([0, 9, 10, 5], False)):
        found, why = SuppliedBoxes().detect([{"phrase": "red circle", "box": box}], cap, (ow, oh), (100, 100))
        assert why == ({} if ok else {"box_out_of_bounds": 1}), box


@pytest.mark.parametrize("size, ok", [((0.5, 0.5), True), ((None, 5), False), ((0, 5), False), ((5, 0), False),
                                      ((-0.5, 5), False), ((5, -0.5), False), ((float("inf"), 5), False),
                                      ((5, float("inf")), False), ((float("nan"), 5), False)])
def test_supplied_boxes_need_a_positive_finite_original_size(size, ok):
    from mmloom.filters.grounding import SuppliedBoxes

    found, why = SuppliedBoxes().detect([{"phrase": "a", "box": [0, 0, 0.5, 0.5]}], "a", size, (10, 10))
    if ok:
        assert why == {} and len(found) == 1
    else:
        assert why == {"no_original_size": 1} and found == []


def test_boxes_backend_config_is_validated():
    from mmloom.curate.config import load_config
    from mmloom.errors import UserError

    assert load_config(None, {"ground.backend": "boxes"}).ground.boxes_column == "boxes"
    with pytest.raises(UserError, match="ground.backend"):
        load_config(None, {"ground.backend": "coco"})
    with pytest.raises(UserError, match="ground.max_boxes"):
        load_config(None, {"ground.max_boxes": 0})


def test_toyworld_config_validates():
    from pathlib import Path

    from mmloom.curate.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "configs" / "toyworld.yaml")
    assert cfg.ground.backend == "boxes" and cfg.ground.boxes_column == "BOXES"
    assert cfg.download.image_size == 512 and cfg.build.min_crop_area == 22500


def test_scene_boxes_are_what_the_metadata_carries():
    s = render_scene(1)
    assert [b["phrase"] for b in scene_boxes(s)] == [o.phrase for o in s.objects]


def _left_pair_retrieval(clip, seeds) -> float:
    """How often a picture's nearest caption (of the held-out pictures' captions) names the
    picture's objects: colour and shape of both, in order (templates aside)."""

    scenes = [render_scene(s, size=256) for s in seeds]
    img = clip.images([s.image for s in scenes])
    txt = clip.texts([s.caption for s in scenes])
    best = (img @ txt.T).argmax(1).tolist()
    return float(np.mean([parse_caption(scenes[b].caption) == parse_caption(s.caption) for s, b in zip(scenes, best)]))


def test_toy_clip_tells_toy_pictures_apart_where_the_random_one_does_not(tmp_path):
    """make_toy_clip (the toy world's stand-in for a released CLIP, bench/learns.py's
    encoder for VD and Kandinsky) learns to match pictures with their captions; the random
    tiny:clip it starts from does not. Fixed steps, so the result does not depend on the
    machine's speed."""
    import torch

    from mmloom.clip import ClipEmbedder, make_open_clip
    from mmloom.testkit.toyworld import make_toy_clip

    held = range(30_000_000, 30_000_000 + 32)  # seeds neither make_toy_clip nor any toy world uses
    with torch.random.fork_rng(devices=[]):
        rand = _left_pair_retrieval(ClipEmbedder(make_open_clip(str(tmp_path / "random"))), held)
        make_toy_clip(str(tmp_path / "toy"), seconds=600, max_steps=150, n=256, echo=lambda s: None)
    trained = _left_pair_retrieval(ClipEmbedder(str(tmp_path / "toy")), held)
    assert rand <= 0.1, rand  # chance: about 1/32 exact matches
    assert trained >= 4 * max(rand, 1 / 32), (trained, rand)  # measured: 0.19 against 0.03 after 150 steps


def test_toyworld_scores_with_the_clip_it_is_given(tmp_path):
    from mmloom.curate.toyworld import toyworld_config

    cfg = toyworld_config(str(tmp_path / "w"), clip=str(tmp_path))
    assert cfg.score.clip.model == cfg.score.aesthetic.clip_model == str(tmp_path)
    assert cfg.score.clip.store_embeddings
    default = toyworld_config(str(tmp_path / "w2"))
    assert default.score.clip.model.endswith("tiny-clip")
