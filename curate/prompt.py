"""The interleaved prompt (ARCHITECTURE.md; MUMU section 4): ordered segments, each crop
placed right before the words it depicts. Joining every segment's ``text`` gives back the
clean caption exactly; ``span`` indexes the clean caption.

``prompt.json`` has two lists whose entries all carry the same keys with the same types
(no key appears in one sample and not in another, no null), so a reader that infers a
schema from the first samples (Hugging Face ``datasets``) keeps every field of every
sample:

* ``segments``: ``{"type": "text" | "image", "text": str, "crop": int}``; an image
  segment has ``text`` "" and ``crop`` its index in ``crops``, a text segment ``crop`` -1;
* ``crops``: ``{"kind": "object" | "head", "phrase", "span": [start, end], "box": [x0, y0,
  x1, y1] in the image, "score", "label", "rect": [x0, y0, x1, y1] in the ``crops.jpg``
  member, "head": index of this object's head crop or -1}``. Objects come first in
  caption order (crop i is the i-th image segment), then the head crops of people.
"""

from __future__ import annotations


def build_segments(clean: str, crops: list[dict]) -> list[dict]:
    """``crops`` in caption order, each with span_start/end; image segment i points at crop i."""
    segments: list[dict] = []
    pos = 0
    for i, c in enumerate(crops):
        s = c["span_start"]
        if s > pos:
            segments.append({"type": "text", "text": clean[pos:s], "crop": -1})
            pos = s
        segments.append({"type": "image", "text": "", "crop": i})
    if pos < len(clean):
        segments.append({"type": "text", "text": clean[pos:], "crop": -1})
    return segments


def crop_entry(c: dict, rect: list[int], kind: str = "object", head: int = -1) -> dict:
    """One ``crops`` entry (same keys and types for every entry)."""
    box = c["head_box"] if kind == "head" else c["box"]
    return {"kind": kind, "phrase": c["phrase"], "span": [int(c["span_start"]), int(c["span_end"])],
            "box": [round(float(v), 1) for v in box], "score": round(float(c["score"]), 4),
            "label": "head" if kind == "head" else c["label"], "rect": [int(v) for v in rect], "head": int(head)}


def reassemble(segments: list[dict]) -> str:
    return "".join(s["text"] for s in segments)


def render(segments: list[dict], crops: list[dict]) -> str:
    """Human-readable: 'a <man: crop 0>man and his <dog: crop 1>dog'."""
    return "".join(s["text"] if s["type"] == "text" else f"<{crops[s['crop']]['phrase']}: crop {s['crop']}>" for s in segments)
