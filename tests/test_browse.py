"""`mmloom browse` in a real browser: headless Chromium (Debian's, driven by playwright)
opens the static site from file:// and the --serve site over http, with no console
error; cards show boxes, crops, prompt, scores and the reject ledger; the filters and
the similarity search work."""

import os
import threading
import urllib.request
import json

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (.ci/run installs Debian's `chromium`)")


@pytest.fixture(scope="module")
def site(crops_dataset):
    from mmloom.curate.browse import write_site

    s = write_site(crops_dataset, progress=False)
    assert (s["selected"], s["rejected"]) == (9, 4)
    return s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("profile")), executable_path=CHROMIUM,
                                                   headless=True, args=ARGS, viewport={"width": 1280, "height": 900})
        yield ctx
        ctx.close()


def open_page(browser, url):
    page = browser.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("article.card")
    return page, errors


def cards(page):
    page.wait_for_timeout(150)
    return page.eval_on_selector_all("article.card", "cs => cs.map(c => c.dataset.key)")


def test_static_site_from_file_shows_every_sample_and_filters(site, browser, tmp_path):
    page, errors = open_page(browser, "file://" + site["index"])
    assert len(cards(page)) == 13
    assert "13 of 13 samples (9 selected, 4 rejected)" in page.inner_text("#status")
    # the sample with three crops: three boxes and two head boxes drawn, three crops in its prompt
    c = page.locator('article[data-key="000005"]')
    assert c.locator("svg rect:not(.head)").count() == 3 and c.locator("svg rect.head").count() == 2
    assert c.locator(".seg-image").count() == 3 and "man" in c.locator(".prompt").inner_text()
    assert "clip_score" in c.locator("table.scores").inner_text()
    page.wait_for_function("document.querySelector('article[data-key=\"000005\"] img').naturalWidth > 0")
    # a reject shows its ledger line
    r = page.locator('article[data-key="000090"]')
    assert "min_clip_score: 0.12 (threshold 0.3)" in r.locator("ul.ledger").inner_text()
    page.select_option("#rule", "min_clip_score")
    assert sorted(cards(page)) == ["000090", "000091", "100090", "100091"]
    page.select_option("#rule", "")
    page.fill("#phrase", "dog")
    assert cards(page) == ["000005"]
    page.fill("#phrase", "")
    page.select_option("#score", "clip_score")
    page.fill("#min", "0.34")
    assert sorted(cards(page)) == ["000003", "000004", "000005", "000006"]
    page.screenshot(path=str(tmp_path / "browse.png"), full_page=False)
    assert os.path.getsize(tmp_path / "browse.png") > 10_000
    assert errors == []


def test_serve_adds_similarity_and_text_search(site, crops_dataset, browser, tmp_path):
    from mmloom.clip import make_open_clip
    from mmloom.curate.browse import serve

    clip = make_open_clip(str(tmp_path / "clip"))
    started = threading.Event()
    box = {}

    def ready(httpd):
        box["httpd"] = httpd
        started.set()

    threading.Thread(target=serve, args=(crops_dataset, 0, clip, ready), daemon=True).start()
    assert started.wait(120)
    base = f"http://127.0.0.1:{box['httpd'].server_address[1]}/"
    try:
        info = json.load(urllib.request.urlopen(base + "api/info"))
        assert info == {"images": 13, "text": True, "text_error": None}
        page, errors = open_page(browser, base)
        page.wait_for_selector("button.similar")
        page.locator('article[data-key="000006"] button.similar').click()
        page.wait_for_function("document.querySelector('#status').textContent.includes('images like 000006')")
        assert cards(page)[0] == "000006"  # nearest to itself first
        page.fill("#text", "a man and a woman")
        page.press("#text", "Enter")
        page.wait_for_function("document.querySelector('#status').textContent.includes('text: a man and a woman')")
        assert len(cards(page)) == 13
        assert errors == []
    finally:
        box["httpd"].shutdown()
