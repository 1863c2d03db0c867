"""The threshold rules, each defined once, compiled for the two stages that apply them.

A rule is a measure of an image or of its caption match (aspect, area, shorter side, CLIP
similarity, NSFW, watermark, aesthetic, face count), a comparison the value must satisfy
to pass, and the config key that sets its threshold. Two stages apply rules, each with
its own columns and its own NULL policy:

* ``ingest`` (`PREFILTER`, thresholds from ``ingest.prefilter``): compiled to a pandas
  mask and a message per failing row ("aspect 2.500 > 1.6667"), over the metadata
  columns (``width``, ``clip_similarity``, ``nsfw_score``, ...). **A missing value
  passes**: LAION and COYO rows often lack a score, and the score stage measures every
  image for real later.
* ``select`` (`SELECT`, thresholds from ``select``): compiled to DuckDB predicates over
  the ``samples`` view (``original_width``, ``clip_score``, ``nsfw``, ...), one query for
  all rules. **A missing value fails**, recorded with the value ``NULL``: we measured it
  ourselves, so a NULL means the measurement failed, and nothing is selected silently.

Defaults and thresholds: Versatile Diffusion section 4.1 (aspect, area, CLIP similarity,
NSFW, watermark), M-VADER section 3.2 (aesthetic, shorter side), MUMU section 4 (people).
Six rules are shared by both stages (``min_clip_similarity`` at ingest is
``min_clip_score`` in select); the aesthetic rule differs: at ingest a score equal to
the threshold passes (a minimum), in select it must be above the threshold.

SQL text holds no data: columns go through `mmloom.manifests.sql.ident`, thresholds are
the ``repr`` of a float made here from the validated config value.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from ..manifests.sql import ident

NullPolicy = Literal["passes", "fails"]


@dataclass(frozen=True)
class Measure:
    """A value read from one column, or derived from two (``ratio``, ``product``, ``least``)."""

    name: str  # as ingest messages print it
    kind: Literal["column", "ratio", "product", "least"]
    fields: tuple[str, ...]  # logical fields; each stage binds them to its columns
    fmt: str = ".3f"  # the value in messages

    def pandas(self, df: pd.DataFrame, columns: dict[str, str]) -> pd.Series:
        x = [df[columns[f]].astype("float64") for f in self.fields]
        if self.kind == "column":
            return x[0]
        a, b = x
        if self.kind == "ratio":
            return a / b.where(b != 0)  # a zero height has no aspect
        if self.kind == "product":
            return a * b
        return np.minimum(a, b)  # a NaN side stays NaN

    def sql(self, columns: dict[str, str]) -> str:
        x = [ident(columns[f]) for f in self.fields]
        if self.kind == "column":
            return x[0]
        a, b = x
        if self.kind == "ratio":
            return f"{a}::DOUBLE / nullif({b}, 0)"
        if self.kind == "product":
            return f"{a}::BIGINT * {b}"
        return f"CASE WHEN {a} IS NULL OR {b} IS NULL THEN NULL ELSE least({a}, {b}) END"  # least() skips NULLs


ASPECT = Measure("aspect", "ratio", ("width", "height"))
AREA = Measure("area", "product", ("width", "height"), ".0f")
SHORTER_SIDE = Measure("min_side", "least", ("width", "height"), ".0f")
CLIP_SIMILARITY = Measure("clip_similarity", "column", ("clip_similarity",))
NSFW = Measure("nsfw", "column", ("nsfw",))
WATERMARK = Measure("watermark", "column", ("watermark",))
AESTHETIC = Measure("aesthetic", "column", ("aesthetic",), ".2f")
FACES = Measure("face_count", "column", ("face_count",), ".0f")

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
NEGATED = {">=": "<", ">": "<=", "<=": ">", "<": ">="}


@dataclass(frozen=True)
class Rule:
    """Passes when ``measure op threshold``."""

    measure: Measure
    op: Literal[">=", ">", "<=", "<"]
    threshold_fmt: str = ""  # the threshold in messages ("" = as written)


# every rule, once
MIN_ASPECT = Rule(ASPECT, ">=")
MAX_ASPECT = Rule(ASPECT, "<=")
MIN_AREA = Rule(AREA, ">=", ".0f")
MIN_CLIP_SIMILARITY = Rule(CLIP_SIMILARITY, ">=")
MAX_NSFW = Rule(NSFW, "<")
MAX_WATERMARK = Rule(WATERMARK, "<")
AESTHETIC_AT_LEAST = Rule(AESTHETIC, ">=")
AESTHETIC_ABOVE = Rule(AESTHETIC, ">")
MIN_SIDE = Rule(SHORTER_SIDE, ">=")
MAX_PEOPLE = Rule(FACES, "<=")


@dataclass(frozen=True)
class Use:
    """The rules one stage applies: config key -> rule (in the order they are checked and
    reported), the column each logical field is read from, and what a missing value does."""

    section: str
    rules: dict[str, Rule]
    columns: dict[str, str]
    null: NullPolicy

    def enabled(self, cfg) -> list[tuple[str, Rule, float | int]]:
        """(config key, rule, threshold) of each rule ``cfg`` switches on (not null)."""
        out = []
        for key, rule in self.rules.items():
            t = getattr(cfg, key)
            if t is None:
                continue
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"{self.section}.{key}: a threshold must be a number, not {type(t).__name__}")
            out.append((key, rule, t))
        return out


PREFILTER = Use(
    "ingest.prefilter",
    {"min_aspect": MIN_ASPECT, "max_aspect": MAX_ASPECT, "min_area": MIN_AREA,
     "min_clip_similarity": MIN_CLIP_SIMILARITY, "max_nsfw": MAX_NSFW, "max_watermark": MAX_WATERMARK,
     "min_aesthetic": AESTHETIC_AT_LEAST},
    {"width": "width", "height": "height", "clip_similarity": "clip_similarity", "nsfw": "nsfw_score",
     "watermark": "watermark_score", "aesthetic": "aesthetic_score"},
    null="passes",
)

SELECT = Use(
    "select",
    {"min_clip_score": MIN_CLIP_SIMILARITY, "max_nsfw": MAX_NSFW, "max_watermark": MAX_WATERMARK,
     "min_aspect": MIN_ASPECT, "max_aspect": MAX_ASPECT, "min_area": MIN_AREA,
     "min_aesthetic": AESTHETIC_ABOVE, "min_side": MIN_SIDE, "max_people": MAX_PEOPLE},
    {"width": "original_width", "height": "original_height", "clip_similarity": "clip_score", "nsfw": "nsfw",
     "watermark": "watermark", "aesthetic": "aesthetic", "face_count": "face_count"},
    null="fails",
)


# -- rules over groups of samples (select) --------------------------------------------

@dataclass(frozen=True)
class GroupRule:
    """A rule that judges a sample against the others: samples closer than the threshold
    form a group (``curate.dedup``) and all but the best one fail, with the distance to
    the kept sample as the value. Applied after the threshold rules, to the samples that
    passed them, in this order (a sample dropped by one is not grouped by the next)."""

    what: str  # the measure, as the ledger names it
    needs: tuple[str, ...]  # columns it reads


GROUP_RULES = {
    "dedup_max_distance": GroupRule("perceptual-hash bits", ("phash", "phash_int")),
    "semantic_dedup_threshold": GroupRule("cosine of the CLIP image embeddings", ("clip_image_embedding",)),
}


# -- to pandas (ingest) ---------------------------------------------------------------

def failure_reasons(use: Use, cfg, df: pd.DataFrame, null: NullPolicy | None = None) -> list[str]:
    """Every rule each row of ``df`` fails, as '; '-joined messages ('' when it passes).
    ``null``: what a missing value does (default: the use's policy)."""
    null = null or use.null
    reasons: list[list[str]] = [[] for _ in range(len(df))]
    for _key, rule, t in use.enabled(cfg):
        m = rule.measure
        values = m.pandas(df, use.columns)
        missing = values.isna()
        fails = ~OPS[rule.op](values, t).fillna(False).astype(bool) & ~missing
        if null == "fails":
            fails |= missing
        shown = format(t, rule.threshold_fmt)
        for i in np.flatnonzero(fails.to_numpy()):
            v = values.iat[i]
            v = "NULL" if pd.isna(v) else format(v, m.fmt)
            reasons[i].append(f"{m.name} {v} {NEGATED[rule.op]} {shown}")
    return ["; ".join(r) for r in reasons]


# -- to SQL (select) ------------------------------------------------------------------

@dataclass
class SqlRule:
    """One compiled rule of the selection query."""

    name: str  # config key that set it
    passes: str  # SQL that is TRUE when the sample passes (never NULL)
    value: str  # SQL of the value recorded when it fails
    threshold: str  # the threshold as recorded in the ledger
    needs: tuple[str, ...]  # columns it reads


def sql_number(x: float | int) -> str:
    """A float made from ``x`` as a DuckDB literal (never text from elsewhere)."""
    f = float(x)
    if math.isfinite(f):
        return repr(f)
    return f"CAST('{'nan' if math.isnan(f) else ('inf' if f > 0 else '-inf')}' AS DOUBLE)"


def sql_rules(use: Use, cfg, null: NullPolicy | None = None) -> list[SqlRule]:
    """The enabled rules as SQL predicates over ``use.columns``. ``null``: what a missing
    value does (default: the use's policy), stated in each predicate with coalesce."""
    null = null or use.null
    out = []
    for key, rule, t in use.enabled(cfg):
        value = rule.measure.sql(use.columns)
        cmp = f"{value} {rule.op} {sql_number(t)}"
        passes = f"coalesce({cmp}, {'true' if null == 'passes' else 'false'})"
        needs = tuple(dict.fromkeys(use.columns[f] for f in rule.measure.fields))
        out.append(SqlRule(key, passes, value, str(t), needs))
    return out
