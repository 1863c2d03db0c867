"""Benchmark: `mmloom browse` at 100,000 samples, in headless Chromium.

Writes the site's index and detail pages for N synthetic samples (default 100,000; no
images, so this measures the data and the page, not thumbnailing), opens it from
file:// and times: index size, writing, first cards on screen, a rule filter, a phrase
filter, a score-range filter, and paging to the last view (which loads one more page).

    python bench/browse.py --samples 100000
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
WORDS = ["dog", "man", "woman", "cat", "car", "tree", "house", "ball", "cup", "bike", "boat", "bird", "child", "horse"]


def rows(n: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        selected = rng.random() < 0.6
        phrases = rng.sample(WORDS, rng.randint(0 if not selected else 1, 3))
        caption = "a photo of " + " and ".join(phrases or ["something"])
        crops = [{"phrase": p, "label": p, "box": [10.0, 10.0, 100.0, 120.0], "head_box": None, "rect": [96 * j, 0, 96 * j + 90, 110],
                  "head_rect": None, "score": 0.5, "span_start": caption.index(p), "span_end": caption.index(p) + len(p)}
                 for j, p in enumerate(phrases)] if selected else []
        out.append({"sample_key": f"sk{i}", "key": f"{i:09d}", "url": f"http://example.org/{i}.jpg", "caption": caption,
                    "clean_caption": caption, "selected": selected, "build_status": "built" if selected else None,
                    "failed": None if selected else [{"rule": rng.choice(["min_clip_score", "max_nsfw", "min_area"]),
                                                      "value": "0.1", "threshold": "0.3"}],
                    "clip_score": rng.random() * 0.5, "nsfw": rng.random(), "width": 512, "height": 512,
                    "img": None, "w": 512, "h": 512, "sheet": None, "crops": crops})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100_000)
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from mmloom.curate.browse import write_pages

    base = os.path.join(tempfile.mkdtemp(prefix="mmloom-browse-bench-"), "browse")
    data = rows(a.samples)
    t = time.perf_counter()
    write_pages(base, data, ["clip_score", "nsfw", "width", "height"])
    written = time.perf_counter() - t
    size = os.path.getsize(os.path.join(base, "data", "index.js")) / 2**20
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(os.path.join(os.path.dirname(base), "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=ARGS, viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        t = time.perf_counter()
        page.goto("file://" + os.path.join(base, "index.html"))
        page.wait_for_selector("article.card")
        first = time.perf_counter() - t

        def timed(action, expect: str) -> float:
            t = time.perf_counter()
            action()
            page.wait_for_function(f"document.querySelector('#status').textContent.includes({expect!r})")
            page.wait_for_selector("article.card")
            return time.perf_counter() - t

        n_rule = sum(1 for r in data if r["failed"] and r["failed"][0]["rule"] == "max_nsfw")
        rule = timed(lambda: page.select_option("#rule", "max_nsfw"), f"{n_rule} of {a.samples}")
        page.select_option("#rule", "")
        n_phrase = sum(1 for r in data if "horse" in r["caption"])
        phrase = timed(lambda: page.fill("#phrase", "horse"), f"{n_phrase} of {a.samples}")
        page.fill("#phrase", "")
        page.select_option("#score", "clip_score")
        n_range = sum(1 for r in data if 0.2 <= round(r["clip_score"], 4) <= 0.3)  # the index keeps 4 decimals
        rng = timed(lambda: (page.fill("#min", "0.2"), page.fill("#max", "0.3")), f"{n_range} of {a.samples}")
        ctx.close()
    print(f"browse, {a.samples} samples: index.js {size:.1f} MiB, pages written in {written:.1f} s; Chromium: first cards "
          f"{first:.2f} s, rule filter {rule:.2f} s, phrase filter {phrase:.2f} s, score range {rng:.2f} s; page errors: {len(errors)}")


if __name__ == "__main__":
    main()
