"""Recognize metadata schemas (LAION-5B family, COYO-700M, any url+caption table).

Column names are matched case-insensitively. Each recognized format maps the source
columns onto mmloom's canonical fields; the source columns themselves are kept too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmloom.errors import UserError

LAION_MARKERS = {"similarity", "punsafe", "pwatermark", "sample_id", "aesthetic_score", "aesthetic", "nsfw", "license", "language"}
COYO_MARKERS = {"clip_similarity_vitb32", "clip_similarity_vitl14", "image_phash", "nsfw_score_opennsfw2", "nsfw_score_gantman", "num_tokens_bert", "aesthetic_score_laion_v2"}


@dataclass
class SourceMapping:
    """Canonical field -> source column(s) (actual spelling), for one file."""

    format: str
    url: str
    caption: str
    width: str | None = None
    height: str | None = None
    clip_similarity: str | None = None
    nsfw: list[str] = field(default_factory=list)  # max of these
    watermark: str | None = None
    aesthetic: str | None = None

    def numeric_fields(self) -> dict[str, list[str]]:
        out = {
            "width": [self.width],
            "height": [self.height],
            "clip_similarity": [self.clip_similarity],
            "nsfw_score": self.nsfw,
            "watermark_score": [self.watermark],
            "aesthetic_score": [self.aesthetic],
        }
        return {k: [c for c in v if c] for k, v in out.items()}


def detect(columns: list[str], fmt: str, url_col: str | None, caption_col: str | None, path: str) -> SourceMapping:
    """Pick the format of a file from its column names (``fmt='auto'``) or check the given one."""
    by_lower: dict[str, str] = {}
    for c in columns:
        by_lower.setdefault(c.lower(), c)
    has = lambda name: name in by_lower  # noqa: E731
    col = lambda name: by_lower.get(name)  # noqa: E731

    def need(name: str, what: str) -> str:
        if name.lower() not in by_lower:
            raise UserError(
                f"{path}: missing required column {name!r} for {what}; columns are {sorted(columns)}"
            )
        return by_lower[name.lower()]

    if fmt == "auto":
        if url_col or caption_col:
            fmt = "generic"
        elif has("url") and has("text"):
            names = set(by_lower)
            fmt = "coyo" if names & COYO_MARKERS else "laion" if names & LAION_MARKERS else "generic"
        else:
            raise UserError(
                f"{path}: cannot detect the metadata format from columns {sorted(columns)}; "
                "pass --format generic --url-col NAME --caption-col NAME"
            )

    if fmt == "laion":
        return SourceMapping(
            "laion", need("url", "LAION format"), need("text", "LAION format"),
            col("width"), col("height"), col("similarity"),
            [c for c in [col("punsafe")] if c], col("pwatermark"),
            col("aesthetic_score") or col("aesthetic"),
        )
    if fmt == "coyo":
        return SourceMapping(
            "coyo", need("url", "COYO format"), need("text", "COYO format"),
            col("width"), col("height"), col("clip_similarity_vitb32"),
            [c for c in [col("nsfw_score_opennsfw2"), col("nsfw_score_gantman")] if c],
            col("watermark_score"), col("aesthetic_score_laion_v2"),
        )
    if fmt == "generic":
        u = need(url_col or "url", "the url (--url-col)")
        if caption_col:
            c = need(caption_col, "the caption (--caption-col)")
        elif has("caption") or has("text"):
            c = col("caption") or col("text")
        else:
            raise UserError(f"{path}: no caption column found; pass --caption-col NAME (columns are {sorted(columns)})")
        return SourceMapping("generic", u, c, col("width"), col("height"))
    raise UserError(f"unknown format {fmt!r} (expected auto, laion, coyo or generic)")
