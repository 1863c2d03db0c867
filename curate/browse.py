"""`mmloom browse DIR`: a static site in DIR/browse/ to look at every judged sample.

Every selected and rejected sample as a thumbnail with its kept crops and their boxes
drawn, its interleaved prompt, every score, and for a reject each rule it failed with the
value and threshold (the reject ledger). Filters: verdict, rule, a score range, a phrase.

It opens from ``file://`` with no server, and stays fast at 100,000 samples: a compact
columnar index (``data/index.js``: what the filters read) is loaded once; the details
come in pages of ``PAGE`` samples (``data/page_NNNNN.js``), loaded only when a sample of
that page is on screen; images load lazily. Pages are JSON wrapped in a function call
(``mmloomPage(N, {...})``) and loaded by ``<script>`` tags, because browsers refuse
``fetch`` of local files. Thumbnails are at most ``THUMB`` pixels; a built sample's
``crops.jpg`` is copied as it is and each crop shown from its rectangle (a CSS sprite).

``serve`` adds a localhost server with search over the stored CLIP image embeddings
(``/api/similar?key=K``: images like that image) and, when the score stage's CLIP model
loads through ``mmloom/clip.py``, by text (``/api/text?q=...``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from importlib import resources

from mmloom.errors import UserError
from .prompt import build_segments
from .score import read_images
from ..manifests.store import ShardStore, shard_name
from ..manifests.views import open_dataset, reading, view_names

OUT = "browse"
PAGE = 200  # samples per detail page
THUMB = 320  # longest side of a thumbnail, pixels
SITE_FILES = ("index.html", "app.js", "style.css")
# score columns shown and filterable, when present (order of display)
SCORES = ["clip_score", "nsfw", "watermark", "aesthetic", "face_count", "original_width", "original_height",
          "width", "height"]


def _js(name: str, obj) -> bytes:
    """``name(obj);`` with the JSON safe inside a script (no ``</script>`` can close it)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=float).replace("</", "<\\/")
    return f"{name}({text});\n".encode()


def _rows(con, names: set[str]) -> tuple[list[dict], list[str]]:
    """Every judged sample in shard and key order (a reject next to the sample it lost to,
    when they share a shard), with scores, ledger, crops and build status."""
    score_cols = [r[0] for r in con.execute("DESCRIBE scores").fetchall()]
    shown = [c for c in SCORES if c in score_cols]
    has = {c: c in score_cols for c in ("clean_caption", "phash")}
    cols = ", ".join(f's."{c}"' for c in shown + [c for c, h in has.items() if h])
    judged = ["SELECT sample_key, true AS selected, NULL::STRUCT(rule VARCHAR, value VARCHAR, threshold VARCHAR)[] AS failed, "
              "shard, key, url, caption FROM selected"]
    if "rejects" in names:
        judged.append("SELECT sample_key, false, failed, shard, key, url, caption FROM rejects")
    build = "f.status AS build_status" if "final" in names else "NULL AS build_status"
    join = "LEFT JOIN final f USING (sample_key)" if "final" in names else ""
    rows = con.execute(f"""
        SELECT j.*, {cols}, {build}
        FROM ({' UNION ALL '.join(judged)}) j LEFT JOIN scores s USING (sample_key) {join}
        ORDER BY j.shard, j.key""").fetchall()
    desc = [d[0] for d in con.description]
    out = [dict(zip(desc, r)) for r in rows]
    crops: dict[str, list[dict]] = {}
    if "crops" in names:
        for r in con.execute("SELECT * FROM crops ORDER BY sample_key, crop_index").fetchall():
            d = dict(zip([x[0] for x in con.description], r))
            crops.setdefault(d["sample_key"], []).append(d)
    for r in out:
        r["crops"] = crops.get(r["sample_key"], [])
    return out, shown


def _thumb(data: bytes) -> tuple[bytes, int, int]:

    from mmloom.imageguard import open_image

    img = open_image(data, 10**8).convert("RGB")
    w, h = img.size
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue(), w, h


def _sheets(store: ShardStore, shard: int) -> dict[str, bytes]:
    """key -> crops.jpg bytes of a committed final/ tar."""
    if not store.is_committed("build", shard):
        return {}
    rel = f"final/{shard_name(shard)}.tar"
    out = {}
    with tarfile.open(fileobj=io.BytesIO(store.read_verified("build", shard, rel))) as t:
        for m in t.getmembers():
            if m.isfile() and m.name.endswith(".crops.jpg"):
                out[m.name[:-len(".crops.jpg")]] = t.extractfile(m).read()
    return out


def write_site(root: str, encode_format: str = "jpg", progress: bool = True) -> dict:
    """Write DIR/browse/; returns counts and the path of index.html."""
    with reading(root):
        return _write_site(root, encode_format, progress)


def _write_site(root: str, encode_format: str, progress: bool) -> dict:
    from tqdm import tqdm

    from mmloom import progress_enabled

    store = ShardStore(root)
    if not store.is_local:
        raise UserError(f"mmloom browse writes a local site: {root} is not a local directory")
    con = open_dataset(root)
    names = set(view_names(con))
    if "selected" not in names or "scores" not in names:
        con.close()
        raise UserError(f"{root} has no selection yet; run `mmloom select {root}` first")
    rows, shown = _rows(con, names)
    con.close()
    base = store.path(OUT)
    for d in ("img", "crops", "data"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    by_shard: dict[int, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(int(r["shard"]), []).append(r)
    for shard in tqdm(sorted(by_shard), desc="browse", unit="shard", disable=not progress_enabled(progress), leave=False):
        blobs = read_images(store, shard, encode_format) if store.is_committed("download", shard) else {}
        sheets = _sheets(store, shard)
        for r in by_shard[shard]:
            data = blobs.get(r["key"])
            r["img"] = r["w"] = r["h"] = None
            if data is not None:
                try:
                    thumb, r["w"], r["h"] = _thumb(data)
                except Exception:  # noqa: BLE001 - an image the guard refuses is shown without a picture
                    thumb = None
                if thumb:
                    r["img"] = f"img/{r['key']}.jpg"
                    _write(os.path.join(base, r["img"]), thumb)
            r["sheet"] = None
            if r["key"] in sheets:
                r["sheet"] = f"crops/{r['key']}.jpg"
                _write(os.path.join(base, r["sheet"]), sheets[r["key"]])
    write_pages(base, rows, shown)
    return {"samples": len(rows), "selected": sum(bool(r["selected"]) for r in rows),
            "rejected": sum(not r["selected"] for r in rows), "pages": -(-len(rows) // PAGE),
            "index": os.path.join(base, "index.html")}


def write_pages(base: str, rows: list[dict], shown: list[str]) -> None:
    """The site files, the columnar index the filters read and the detail pages."""
    rules = sorted({f["rule"] for r in rows for f in (r["failed"] or [])})
    phrases = sorted({c["phrase"].lower() for r in rows for c in r["crops"]})
    rule_id, phrase_id = {x: i for i, x in enumerate(rules)}, {x: i for i, x in enumerate(phrases)}
    index = {"n": len(rows), "page": PAGE, "rules": rules, "phrases": phrases, "scores": shown,
             "selected": [int(r["selected"]) for r in rows],
             "fails": [[rule_id[f["rule"]] for f in (r["failed"] or [])] for r in rows],
             "phrase": [sorted({phrase_id[c["phrase"].lower()] for c in r["crops"]}) for r in rows],
             "text": [(r.get("clean_caption") or r["caption"] or "").lower()[:160] for r in rows],
             "keys": [r["key"] for r in rows],
             "values": {c: [None if r.get(c) is None else round(float(r[c]), 4) for r in rows] for c in shown}}
    os.makedirs(os.path.join(base, "data"), exist_ok=True)
    _write(os.path.join(base, "data", "index.js"), _js("mmloomIndex", index))
    for p in range(0, len(rows), PAGE):
        _write(os.path.join(base, "data", f"page_{p // PAGE:05d}.js"),
               _js("mmloomPage", {"page": p // PAGE, "samples": [_detail(r, shown) for r in rows[p:p + PAGE]]}))
    site = resources.files(__package__).joinpath("browse_site")
    for name in SITE_FILES:
        _write(os.path.join(base, name), site.joinpath(name).read_bytes())


def _detail(r: dict, shown: list[str]) -> dict:
    """What a card shows of one sample."""
    crops = [{"phrase": c["phrase"], "label": c.get("label") or "", "box": c["box"], "head_box": c["head_box"],
              "rect": c["rect"], "head_rect": c["head_rect"], "score": c["score"],
              "span_start": c["span_start"], "span_end": c["span_end"]} for c in r["crops"]]
    clean = r.get("clean_caption") or ""
    segments = build_segments(clean, crops) if crops else ([{"type": "text", "text": clean, "crop": -1}] if clean else [])
    return {"key": r["key"], "sample_key": r["sample_key"], "url": r["url"], "caption": r["caption"], "clean_caption": clean,
            "selected": bool(r["selected"]), "build_status": r["build_status"], "failed": r["failed"] or [],
            "scores": {c: r.get(c) for c in shown + (["phash"] if "phash" in r else [])},
            "img": r["img"], "w": r["w"], "h": r["h"], "sheet": r["sheet"], "crops": crops, "segments": segments}


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- --serve
class Search:
    """k-NN over the stored CLIP image embeddings of the browsed samples (faiss), and text
    queries through the score stage's CLIP model when it loads."""

    def __init__(self, root: str, clip_model: str | None):
        import faiss
        import numpy as np

        con = open_dataset(root)
        names = set(view_names(con))
        cols = {r[0] for r in con.execute("DESCRIBE scores").fetchall()} if "scores" in names else set()
        if "clip_image_embedding" not in cols:
            con.close()
            raise UserError(f"{root}: the score stage stored no CLIP image embeddings (score.clip.store_embeddings), "
                            "so there is nothing to search; `mmloom browse` without --serve still works")
        keys = "SELECT sample_key FROM selected" + (" UNION ALL SELECT sample_key FROM rejects" if "rejects" in names else "")
        rows = con.execute(f"""SELECT s.key, s.clip_image_embedding FROM scores s
                               WHERE s.clip_image_embedding IS NOT NULL AND s.sample_key IN ({keys}) ORDER BY s.key""").fetchall()
        con.close()
        self.keys = [k for k, _e in rows]
        x = np.asarray([e for _k, e in rows], dtype=np.float32).reshape(len(rows), -1)
        faiss.normalize_L2(x)
        self.x = x
        self.index = faiss.IndexFlatIP(x.shape[1])
        self.index.add(x)
        self.row = {k: i for i, k in enumerate(self.keys)}
        self.text_error, self.clip = None, None
        if clip_model:
            try:
                from mmloom.clip import ClipEmbedder

                self.clip = ClipEmbedder(clip_model)
            except UserError as e:
                self.text_error = str(e)
        else:
            self.text_error = "no CLIP model in the dataset's config"

    def _search(self, q, k: int) -> list[dict]:
        sims, ids = self.index.search(q.reshape(1, -1), min(k, len(self.keys)))
        return [{"key": self.keys[i], "score": round(float(s), 4)} for s, i in zip(sims[0], ids[0]) if i >= 0]

    def similar(self, key: str, k: int = 48) -> list[dict]:
        if key not in self.row:
            raise KeyError(key)
        return self._search(self.x[self.row[key]], k)

    def text(self, q: str, k: int = 48) -> list[dict]:
        if self.clip is None:
            raise LookupError(self.text_error)
        e = self.clip.texts([q]).numpy().astype("float32")
        return self._search(e[0], k)


def serve(root: str, port: int = 8765, clip_model: str | None = None, ready=None) -> None:
    """Serve DIR/browse/ on 127.0.0.1 with the search API until interrupted."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    search = Search(root, clip_model)
    site = ShardStore(root).path(OUT)

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *a):  # quiet terminal
            pass

        def _json(self, code: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            u = urlsplit(self.path)
            if not u.path.startswith("/api/"):
                return super().do_GET()
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            try:
                k = max(1, min(int(q.get("k", 48)), 1000))
                if u.path == "/api/info":
                    return self._json(200, {"images": len(search.keys), "text": search.clip is not None,
                                            "text_error": search.text_error})
                if u.path == "/api/similar":
                    return self._json(200, {"results": search.similar(q.get("key", ""), k)})
                if u.path == "/api/text":
                    return self._json(200, {"results": search.text(q.get("q", "")[:300], k)})
                return self._json(404, {"error": "unknown endpoint"})
            except KeyError:
                return self._json(404, {"error": "no stored embedding for that key"})
            except LookupError as e:
                return self._json(503, {"error": f"text search is off: {e}"})
            except ValueError:
                return self._json(400, {"error": "bad parameter"})

    httpd = ThreadingHTTPServer(("127.0.0.1", port), partial(Handler, directory=site))
    if ready is not None:
        ready(httpd)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
