"""Caption cleaning against real web-caption shapes, one group per rule of VD appendix C.1."""

import subprocess
import sys

import pytest

from mmloom.curate.captions import clean, clean_caption

CASES = [
    # (a) URLs, links, emails
    ("Beach house for rent http://www.example.com/listing?id=42", "Beach house for rent"),
    ("Sunset photo | www.flickr.com/photos/abc", "Sunset photo"),
    ("Buy now at shop.example.co.uk/item/123 !", "Buy now at!"),
    ("contact me: jane.doe+art@gmail.com for prints", "contact me: for prints"),
    ("https://i.pinimg.com/originals/ab/cd.jpg", ""),
    # (b) HTML
    ("<b>Vintage</b> poster <br/>1950s", "Vintage poster 1950s"),
    ("Tom &amp; Jerry &lt;i&gt;cartoon&lt;/i&gt;", "Tom & Jerry cartoon"),
    ('<a href="http://x.org">Cute cat</a>', "Cute cat"),
    # (c) square and curly brackets
    ("Red dress [Size M] {sku:1234}", "Red dress"),
    ("Mountain lake [photo by [John]] at dawn", "Mountain lake at dawn"),
    ("Logo design {{template}}", "Logo design"),
    # (d) stray dashes, slashes, underscores; joiners kept
    ("Men's T-shirt -- black / white", "Men's T-shirt black white"),
    ("IMG_2034 - beach___sunset", "IMG 2034 beach sunset"),
    ("open 24/7 - coffee shop", "open 24/7 coffee shop"),
    ("well-known artist \u2014 oil painting", "well-known artist oil painting"),
    # (e) quotes, keep 's
    ('"The Starry Night" by Van Gogh', "The Starry Night by Van Gogh"),
    ("\u201cHappy Birthday\u201d card for Mom\u2019s day", "Happy Birthday card for Mom's day"),
    ("the dog's 'favorite' toy", "the dog's favorite toy"),
    ("it's `quoted` don't", "it's quoted dont"),
    # unicode and whitespace
    ("Ｆｕｌｌ\u3000width   text\n\twith\u00a0spaces", "Full width text with spaces"),
    ("caf\u0065\u0301 latte", "caf\u00e9 latte"),
]


@pytest.mark.parametrize("raw, want", CASES)
def test_rules(raw, want):
    assert clean(raw) == want


@pytest.mark.parametrize("raw, _want", CASES)
def test_idempotent(raw, _want):
    once = clean(raw)
    assert clean(once) == once


def test_empty_result_has_a_reason():
    assert clean_caption("http://example.com/a.jpg") == ("", "caption is empty after cleaning")
    assert clean_caption(None) == ("", "caption is null")
    assert clean_caption("a red car") == ("a red car", None)
    assert clean_caption("[--] ...")[1] is not None


def test_cli_clean_caption():
    r = subprocess.run([sys.executable, "-m", "mmloom", "clean-caption", "<b>A cat</b> [IMG_1] http://x.com"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "A cat"
    r = subprocess.run([sys.executable, "-m", "mmloom", "clean-caption", "http://x.com"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "empty after cleaning" in r.stderr
