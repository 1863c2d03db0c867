"""Caption cleaning, Versatile Diffusion appendix C.1 rules (a) to (e).

(a) remove HTTP links, URLs and email addresses; (b) remove HTML syntax; (c) remove
content in square or curly brackets; (d) remove stray dashes, slashes and underscores
(those that do not join two word characters, as in "T-shirt" or "24/7"); (e) remove
every kind of quote but keep the apostrophe of 's. Then unicode (NFKC) and whitespace
are normalized. Cleaning is idempotent: clean(clean(x)) == clean(x). An empty result is
never silent: `clean_caption` returns the reason with it.
"""

from __future__ import annotations

import html
import re
import unicodedata

_TLDS = "com|net|org|edu|gov|io|co|uk|de|fr|ru|jp|cn|info|biz|me|us|ca|au|nl|it|es|pl|br|in|ly|gl|tv|app|xyz|site|shop"
_URL = re.compile(
    r"(?:(?:https?|ftp)://|www\.)\S+"  # scheme or www.
    rf"|\b[\w-]+(?:\.[\w-]+)*\.(?:{_TLDS})\b(?:/\S*)?",  # bare domains like example.com/path
    re.IGNORECASE,
)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_TAG = re.compile(r"<[^>]*>")
_BRACKETS = re.compile(r"\[[^\[\]]*\]|\{[^{}]*\}")
_UNCLOSED_BRACKET = re.compile(r"[\[\]{}]")
# a run of dashes/slashes/underscores that does not sit between two word characters
_STRAY = re.compile(r"(?<!\w)[-_/\\\u2010-\u2015]+|[-_/\\\u2010-\u2015]+(?!\w)|_+|[-/\\\u2010-\u2015]{2,}")
_QUOTES = "\"'`\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u00ab\u00bb\u2039\u203a\u00b4"
_APOSTROPHE_S = re.compile(r"(?<=\w)['\u2019`\u00b4]s\b")
_QUOTE_CHARS = re.compile(f"[{re.escape(_QUOTES)}]")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_REPEATED_PUNCT = re.compile(r"([,;:])(?:\s*[,;:])+")
_EDGE_PUNCT = re.compile(r"^[\s,;:.|]+|[\s,;:|]+$")
_KEEP = "\x00S\x00"  # placeholder for the apostrophe of 's


def _clean_once(text: str) -> str:
    t = unicodedata.normalize("NFKC", text)
    t = html.unescape(t)  # (b) entities first so "&lt;b&gt;" is seen as a tag
    t = _TAG.sub(" ", t)  # (b)
    t = _EMAIL.sub(" ", t)  # (a) emails before URLs: "a@b.com" is not a domain
    t = _URL.sub(" ", t)  # (a)
    while (u := _BRACKETS.sub(" ", t)) != t:  # (c), innermost first, so nesting goes too
        t = u
    t = _UNCLOSED_BRACKET.sub(" ", t)
    t = _STRAY.sub(" ", t)  # (d)
    t = _APOSTROPHE_S.sub(_KEEP, t)  # (e)
    t = _QUOTE_CHARS.sub("", t)
    t = t.replace(_KEEP, "'s")
    t = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in t)  # control chars
    t = _SPACES.sub(" ", t)
    t = _SPACE_BEFORE_PUNCT.sub(r"\1", t)
    t = _REPEATED_PUNCT.sub(r"\1", t)
    t = _EDGE_PUNCT.sub("", t)
    return t.strip()


def clean(text: str) -> str:
    """The cleaned caption (possibly empty). Applied until it stops changing."""
    prev, cur = None, text or ""
    for _ in range(8):
        if cur == prev:
            break
        prev, cur = cur, _clean_once(cur)
    return cur


def clean_caption(text: str | None) -> tuple[str, str | None]:
    """(clean caption, reason it is unusable or None)."""
    if text is None:
        return "", "caption is null"
    out = clean(text)
    if not out:
        return "", "caption is empty after cleaning"
    if not any(ch.isalnum() for ch in out):
        return out, "caption has no letters or digits after cleaning"
    return out, None
