"""MUMU's crop rules (section 4) on one image's detections, as a pure function.

Order: drop boxes below ``min_crop_area`` or above ``max_crop_fraction`` of the image;
merge duplicate boxes of one phrase (IoU >= ``merge_iou``, the higher score stays); keep
the best box per phrase occurrence (caption span); take at most ``max_crops``, distinct
phrases first, by score; return them in caption order. Every dropped box is counted by
reason, so the card can show where boxes went.
"""

from __future__ import annotations

from collections import Counter

from .config import BuildConfig
from ..filters.grounding import iou


def box_area(b) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def apply_crop_rules(dets: list[dict], image_size: tuple[int, int], cfg: BuildConfig) -> tuple[list[dict], Counter]:
    """``dets``: dicts with phrase, span_start, span_end, box, score, det_id (+ anything)."""
    W, H = image_size
    why: Counter = Counter()
    sized = []
    for d in dets:
        a = box_area(d["box"])
        if a < cfg.min_crop_area:
            why["too_small"] += 1
        elif a > cfg.max_crop_fraction * W * H:
            why["too_large"] += 1
        else:
            sized.append(d)
    by_score = sorted(sized, key=lambda d: (-d["score"], d["det_id"]))
    merged: list[dict] = []
    for d in by_score:
        if any(m["phrase"].lower() == d["phrase"].lower() and iou(m["box"], d["box"]) >= cfg.merge_iou for m in merged):
            why["merged_duplicate"] += 1
        else:
            merged.append(d)
    per_span: dict[tuple[int, int], dict] = {}
    for d in merged:
        span = (d["span_start"], d["span_end"])
        if span in per_span:
            why["same_phrase_occurrence"] += 1
        else:
            per_span[span] = d
    ranked = list(per_span.values())  # still by score
    chosen: list[dict] = []
    seen: set[str] = set()
    for d in ranked:  # distinct phrases first
        if len(chosen) < cfg.max_crops and d["phrase"].lower() not in seen:
            chosen.append(d)
            seen.add(d["phrase"].lower())
    for d in ranked:
        if len(chosen) < cfg.max_crops and not any(d is c for c in chosen):
            chosen.append(d)
    why["over_max_crops"] += len(ranked) - len(chosen)
    chosen.sort(key=lambda d: (d["span_start"], d["span_end"], d["det_id"]))
    return chosen, why
