"""Crop rules on hand-made detections (MUMU section 4) and the prompt format."""

import random

import pytest

from mmloom.curate.config import BuildConfig
from mmloom.curate.crops import apply_crop_rules
from mmloom.curate.prompt import build_segments, crop_entry, reassemble, render

CFG = BuildConfig()  # 150x150 minimum, 75% maximum, 3 crops, IoU 0.5


def det(i, phrase, span, box, score=0.5, person=False):
    return {"det_id": i, "phrase": phrase, "span_start": span[0], "span_end": span[1], "box": box,
            "score": score, "is_person": person, "head_box": None}


def test_size_limits_are_inclusive():
    img = (400, 300)  # 120000 px, 75% = 90000
    dets = [
        det(0, "a", (0, 1), [0, 0, 150, 150]),  # exactly 150x150: kept
        det(1, "b", (2, 3), [0, 0, 150, 149.9]),  # just below: dropped
        det(2, "c", (4, 5), [0, 0, 300, 300]),  # exactly 75%: kept
        det(3, "d", (6, 7), [0, 0, 301, 300]),  # just above: dropped
    ]
    kept, why = apply_crop_rules(dets, img, CFG)
    assert [d["phrase"] for d in kept] == ["a", "c"]
    assert why["too_small"] == 1 and why["too_large"] == 1


def test_at_most_three_distinct_phrases_first_in_caption_order():
    img = (1000, 1000)
    b = lambda x: [x, x, x + 200, x + 200]  # noqa: E731
    dets = [
        det(0, "dog", (10, 13), b(0), 0.9), det(1, "dog", (30, 33), b(300), 0.85),  # a second dog occurrence
        det(2, "man", (2, 5), b(100), 0.6), det(3, "hat", (40, 43), b(500), 0.5), det(4, "ball", (50, 54), b(700), 0.4),
    ]
    kept, why = apply_crop_rules(dets, img, CFG)
    # distinct phrases by score (dog, man, hat) beat the second dog; then caption order
    assert [(d["phrase"], d["span_start"]) for d in kept] == [("man", 2), ("dog", 10), ("hat", 40)]
    assert why["over_max_crops"] == 2
    kept, _ = apply_crop_rules(dets[:2] + dets[2:3], img, CFG)  # room left: the repeated phrase fills it
    assert [(d["phrase"], d["span_start"]) for d in kept] == [("man", 2), ("dog", 10), ("dog", 30)]


def test_duplicate_boxes_of_one_phrase_merge_to_the_best():
    img = (1000, 1000)
    dets = [det(0, "dog", (2, 5), [100, 100, 400, 400], 0.5), det(1, "Dog", (2, 5), [110, 105, 405, 410], 0.7),
            det(2, "dog", (2, 5), [600, 600, 900, 900], 0.4)]  # far away: same phrase occurrence, lower score
    kept, why = apply_crop_rules(dets, img, CFG)
    assert len(kept) == 1 and kept[0]["det_id"] == 1
    assert why["merged_duplicate"] == 1 and why["same_phrase_occurrence"] == 1


def test_iou_of_boxes_that_overlap_touch_or_have_no_area():
    from mmloom.filters.grounding import iou

    a, b = [1, 2, 11, 7], [4, 3, 20, 13]  # 10x5 and 16x10, overlapping 7x4
    assert iou(a, b) == iou(b, a) == pytest.approx(28 / (50 + 160 - 28))
    assert iou(a, a) == 1.0
    assert iou([0, 0, 2, 2], [3, 0, 5, 2]) == 0.0  # apart along x only
    assert iou([0, 0, 2, 2], [0, 3, 2, 5]) == 0.0  # apart along y only
    assert iou([0, 0, 1, 1], [5, 5, 6, 6]) == 0.0  # apart along both
    assert iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]) == 1.0  # under a pixel of area
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # no area: no overlap, not 0 / 0


def test_segments_place_crops_before_their_words_and_reassemble():
    clean = "a man and his dog"
    crops = [
        {"phrase": "man", "span_start": 2, "span_end": 5, "box": [0, 0, 9, 9], "score": 0.6, "label": "person", "head_box": [1, 1, 4, 4]},
        {"phrase": "dog", "span_start": 14, "span_end": 17, "box": [1, 1, 8, 8], "score": 0.5, "label": "dog", "head_box": None},
    ]
    segs = build_segments(clean, crops)
    assert [s["type"] for s in segs] == ["text", "image", "text", "image", "text"]
    assert segs[0]["text"] == "a " and segs[2]["text"] == "man and his " and segs[4]["text"] == "dog"
    assert [s["crop"] for s in segs] == [-1, 0, -1, 1, -1]
    # every segment and every crop entry carries the same keys (schema-inferring readers keep them all)
    assert len({tuple(sorted(s)) for s in segs}) == 1
    entries = [crop_entry(crops[0], [0, 0, 9, 9], head=2), crop_entry(crops[1], [16, 0, 23, 7]),
               crop_entry(crops[0], [32, 0, 35, 3], kind="head")]
    assert len({tuple(sorted(e)) for e in entries}) == 1
    assert entries[0]["head"] == 2 and entries[2]["box"] == [1.0, 1.0, 4.0, 4.0] and entries[2]["label"] == "head"
    assert reassemble(segs) == clean
    assert render(segs, entries) == "a <man: crop 0>man and his <dog: crop 1>dog"


@pytest.mark.parametrize("seed", range(20))
def test_reassembly_for_random_spans(seed):
    rng = random.Random(seed)
    clean = " ".join(rng.choice(["a", "red", "dog", "runs", "on", "grass", "with", "his", "owner"]) for _ in range(rng.randint(1, 12)))
    words = [(i, i + len(w)) for i, w in _word_starts(clean)]
    picked = sorted(rng.sample(words, k=min(len(words), rng.randint(0, 3))))
    crops = [{"phrase": clean[s:e], "span_start": s, "span_end": e, "box": [0, 0, 1, 1],
              "score": 0.5, "label": clean[s:e]} for i, (s, e) in enumerate(picked)]
    segs = build_segments(clean, crops)
    assert reassemble(segs) == clean
    for s in segs:
        if s["type"] == "image":
            c = crops[s["crop"]]
            assert clean[c["span_start"]:c["span_end"]] == c["phrase"]


def _word_starts(text):
    pos = 0
    for w in text.split(" "):
        yield pos, w
        pos += len(w) + 1
