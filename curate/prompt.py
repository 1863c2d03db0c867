"""The interleaved prompt (ARCHITECTURE.md; MUMU section 4): ordered segments, each crop placed right before
the words it depicts (MUMU section 4). Joining the text segments gives back the clean
caption exactly; ``span`` indexes the clean caption."""

from __future__ import annotations


def build_segments(clean: str, crops: list[dict]) -> list[dict]:
    """``crops`` in caption order, each with member, phrase, span_start/end, box, score,
    label and optionally head_member."""
    segments: list[dict] = []
    pos = 0
    for c in crops:
        s = c["span_start"]
        if s > pos:
            segments.append({"type": "text", "text": clean[pos:s]})
            pos = s
        seg = {"type": "image", "member": c["member"], "phrase": c["phrase"], "span": [c["span_start"], c["span_end"]],
               "box": [round(float(v), 1) for v in c["box"]], "score": round(float(c["score"]), 4), "label": c["label"]}
        if c.get("head_member"):
            seg["head_member"] = c["head_member"]
        segments.append(seg)
    if pos < len(clean):
        segments.append({"type": "text", "text": clean[pos:]})
    return segments


def reassemble(segments: list[dict]) -> str:
    return "".join(s["text"] for s in segments if s["type"] == "text")


def render(segments: list[dict]) -> str:
    """Human-readable: 'a <man: crop0.jpg>man and his <dog: crop1.jpg>dog'."""
    return "".join(s["text"] if s["type"] == "text" else f"<{s['phrase']}: {s['member']}>" for s in segments)
