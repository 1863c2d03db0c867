"""`mmloom browse` shows strangers' captions and URLs: in a real browser (headless
Chromium) markup stays text, a script URL never becomes a link, and the page data cannot
close its script tag."""

import os

import pytest

from test_browse import ARGS, CHROMIUM, open_page  # noqa: F401 - the same browser setup

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (.ci/run installs Debian's `chromium`)")


def test_captions_and_urls_from_strangers_are_shown_as_text(crops_dataset, tmp_path):
    from playwright.sync_api import sync_playwright

    from mmloom.curate.browse import write_site

    s = write_site(crops_dataset, progress=False)
    page_js = open(os.path.join(os.path.dirname(s["index"]), "data", "page_00000.js"), encoding="utf-8").read()
    assert "<img src=x" in page_js and "</" not in page_js  # JSON with </ escaped: no </script> can end it
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page, errors = open_page(ctx, "file://" + s["index"])
            h = page.locator('article[data-key="100091"]')
            assert "<img src=x onerror=" in h.inner_text() and h.locator("img[src='x']").count() == 0
            assert h.locator("a").count() == 0  # javascript: is not a link
            assert page.title() == "mmloom browse" and errors == []
        finally:
            ctx.close()
