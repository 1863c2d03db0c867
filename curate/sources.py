"""Recognize metadata schemas (LAION-5B family, COYO-700M, any url+caption table).

Column names are matched case-insensitively. Each recognized format maps the source
columns onto mmloom's canonical fields; the source columns themselves are kept too.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

from mmloom.errors import UserError

LAION_MARKERS = {"similarity", "punsafe", "pwatermark", "sample_id", "aesthetic_score", "aesthetic", "nsfw", "license", "language"}
COYO_MARKERS = {"clip_similarity_vitb32", "clip_similarity_vitl14", "image_phash", "nsfw_score_opennsfw2", "nsfw_score_gantman", "num_tokens_bert", "aesthetic_score_laion_v2"}


PLAIN_NAME = re.compile(r"[a-z0-9_]{1,64}")
PANDAS_INDEX = re.compile(r"__index_level_\d+__")


def _name_hash(name: str) -> str:
    return hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()


def src_columns(names: list[str]) -> list[str]:
    """The candidates column that keeps each source column of one file (README, ingest).

    ``src_`` + the name in lowercase when that is 1-64 characters of ``a-z0-9_`` (every
    LAION and COYO column: ``src_url``, ``src_sample_id``). Any other name (quotes,
    spaces, punctuation, non-ASCII, NUL, longer than 64) has each run of other characters
    (after dropping accents) replaced by ``_``, is cut to 48 characters and gets ``_`` + 8 hex digits of a hash of
    the exact name: ``quo"te`` -> ``src_quo_te_<hash>``. A name already given to an earlier
    column of the file (``url`` after ``URL``) gets the hash suffix too, so no column is
    ever overwritten. The result is always a plain SQL identifier, and a given name maps
    the same way in every file.
    """
    out: list[str] = []
    taken: set[str] = set()
    for name in names:
        low = name.lower()
        if PLAIN_NAME.fullmatch(low):
            cand = f"src_{low}"
        else:
            folded = "".join(ch for ch in unicodedata.normalize("NFKD", low) if not unicodedata.combining(ch))
            cand = f"src_{re.sub(r'[^a-z0-9_]+', '_', folded)[:48]}_{_name_hash(name)}"
        if cand in taken:
            cand = f"{cand}_{_name_hash(name)}"
        n = 2
        base = cand
        while cand in taken:
            cand, n = f"{base}_{n}", n + 1
        taken.add(cand)
        out.append(cand)
    return out


def pandas_index_columns(schema) -> set[str]:
    """Unnamed index columns pandas stored in the file (``__index_level_0__``): bookkeeping
    of the DataFrame that wrote it, not metadata. A named index is an ordinary column."""
    if not schema.metadata or b"pandas" not in schema.metadata:
        return set()
    try:
        index = schema.pandas_metadata.get("index_columns", [])
    except (ValueError, AttributeError):  # not JSON, or not an object: no index to drop
        return set()
    names = set(schema.names)
    return {c for c in index if isinstance(c, str) and PANDAS_INDEX.fullmatch(c) and c in names} if isinstance(index, list) else set()


def _listing(columns: list[str], most: int = 30, width: int = 40) -> str:
    """Column names for an error message: one line, each name cut short, at most ``most``."""
    names = [repr(c if len(c) <= width else c[:width] + "...") for c in sorted(columns)[:most]]
    more = f", ... ({len(columns) - most} more)" if len(columns) > most else ""
    return "[" + ", ".join(names) + more + "]"


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
                f"{path}: missing required column {name!r} for {what}; columns are {_listing(columns)}"
            )
        return by_lower[name.lower()]

    if fmt == "auto":
        if url_col or caption_col:
            fmt = "generic"
        elif has("url") and has("text"):
            names = set(by_lower)
            # LAION's own spelling of its two columns (img2dataset: --url_col URL --caption_col TEXT)
            laion = bool(names & LAION_MARKERS) or {"URL", "TEXT"} <= set(columns)
            fmt = "coyo" if names & COYO_MARKERS else "laion" if laion else "generic"
        else:
            raise UserError(
                f"{path}: cannot detect the metadata format from columns {_listing(columns)}; "
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
            raise UserError(f"{path}: no caption column found; pass --caption-col NAME (columns are {_listing(columns)})")
        return SourceMapping("generic", u, c, col("width"), col("height"))
    raise UserError(f"unknown format {fmt!r} (expected auto, laion, coyo or generic)")

