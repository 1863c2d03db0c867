"""The dataset card, DIR/README.md: the funnel from metadata rows to final samples,
score histograms, crop statistics, example prompts (pictured), and the config used.

Written with huggingface_hub's ``DatasetCard``, so the Hub renders it as a dataset card:
YAML front matter with the size category, the config (``default``: the final/
webdataset shards as the train split), and the features of the shards' members (what ``datasets.load_dataset(DIR)`` uses
instead of guessing from the first samples). The licence is left for the user: mmloom
cannot know the terms of images collected from the web.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import yaml

from .config import PipelineConfig
from .prompt import render
from .stats import funnel, render as render_funnel
from ..manifests.store import ShardStore
from ..manifests.sql import ident
from ..manifests.views import open_dataset, reading, view_names


def _save(store: ShardStore, fig, rel: str, dpi: int) -> str:
    """Write a matplotlib figure into the dataset (any filesystem); returns ``rel``."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    store.write_bytes(rel, buf.getvalue())
    return rel


def _plots(store: ShardStore, con, names: set[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    if "scores" in names:
        cols = [c for c in ("clip_score", "nsfw", "watermark", "aesthetic") if c in {r[0] for r in con.execute("DESCRIBE scores").fetchall()}]
        fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3), squeeze=False)
        sel = set(r[0] for r in con.execute("SELECT sample_key FROM selected").fetchall()) if "selected" in names else set()
        for ax, c in zip(axes[0], cols):
            rows = con.execute(f"SELECT sample_key, {ident(c)} FROM scores WHERE {ident(c)} IS NOT NULL").fetchall()
            allv = [v for _k, v in rows]
            selv = [v for k, v in rows if k in sel]
            ax.hist(allv, bins=20, alpha=0.5, label="scored")
            if selv:
                ax.hist(selv, bins=20, alpha=0.7, label="selected")
            ax.set_title(c)
            ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(_save(store, fig, "card/scores.png", dpi=80))
    if "final" in names:
        counts = [r[0] for r in con.execute("SELECT n_crops FROM final").fetchall()]
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.hist(counts, bins=range(0, max(counts + [3]) + 2), align="left", rwidth=0.8)
        ax.set_title("crops per selected sample")
        fig.tight_layout()
        out.append(_save(store, fig, "card/crops.png", dpi=80))
    return out


def _examples(store: ShardStore, n: int) -> list[tuple[str, str]]:
    """(rendered prompt, picture path) for the first ``n`` built samples."""
    if n <= 0:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt
    from PIL import Image

    out = []
    for shard in store.committed_shards("build"):
        with store.open("final", f"{shard:05d}.tar") as f, tarfile.open(fileobj=f) as t:
            members = {m.name: m for m in t.getmembers()}
            keys = sorted({name.split(".", 1)[0] for name in members})
            for key in keys:
                if len(out) >= n:
                    return out
                prompt = json.loads(t.extractfile(members[f"{key}.prompt.json"]).read())
                crops = prompt["crops"]
                imgs = [crops[s["crop"]] for s in prompt["segments"] if s["type"] == "image"]
                image_name = next(m for m in members if m.startswith(key + ".") and m.count(".") == 1 and m.endswith(("jpg", "png", "webp")))
                img = Image.open(io.BytesIO(t.extractfile(members[image_name]).read()))
                sheet = Image.open(io.BytesIO(t.extractfile(members[f"{key}.crops.jpg"]).read()))
                fig, axes = plt.subplots(1, 1 + len(imgs), figsize=(3 * (1 + len(imgs)), 3), squeeze=False)
                axes[0][0].imshow(img)
                for c in imgs:
                    x0, y0, x1, y1 = c["box"]
                    axes[0][0].add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=2))
                for ax, c in zip(axes[0][1:], imgs):
                    ax.imshow(sheet.crop(tuple(c["rect"])))
                    ax.set_title(c["phrase"] + (" (+head)" if c["head"] >= 0 else ""), fontsize=9)
                for ax in axes[0]:
                    ax.axis("off")
                text = render(prompt["segments"], crops)
                fig.suptitle(text[:90], fontsize=9)
                fig.tight_layout()
                rel = _save(store, fig, f"card/example_{len(out)}.png", dpi=70)
                out.append((text, rel))
    return out


SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` value for ``n`` samples."""
    return next((name for limit, name in SIZES if n < limit), "1B<n<10B")


def _v(name: str, dtype: str) -> dict:
    return {"name": name, "dtype": dtype}


def _struct(name: str, fields: list[dict], listed: bool = False) -> dict:
    return {"name": name, "list" if listed else "struct": fields}


def features(score_types: dict[str, str], embeddings: bool) -> list[dict]:
    """The members of every final/ sample (``schemas.FINAL_MEMBERS``) as Hugging Face
    features in the card's YAML layout."""
    crop = [_v("kind", "string"), _v("phrase", "string"), {"name": "span", "list": "int64"},
            {"name": "box", "list": "float64"}, _v("score", "float64"), _v("label", "string"),
            {"name": "rect", "list": "int64"}, _v("head", "int64")]
    out = [_v("jpg", "image"), _v("txt", "string"), _v("raw.txt", "string"), _v("crops.jpg", "image"),
           _struct("prompt.json", [_struct("segments", [_v("type", "string"), _v("text", "string"), _v("crop", "int64")], True),
                                   _struct("crops", crop, True)]),
           _struct("scores.json", [_v(k, t) for k, t in sorted(score_types.items())]),
           _struct("json", [_v("has_person", "bool"), _v("key", "string"), _v("sample_key", "string"),
                            _v("url", "string"), _v("weight", "float64")])]
    if embeddings:
        out.append({"name": "clip_image.npy", "list": "float32"})
    return out + [_v("__key__", "string"), _v("__url__", "string")]


def _first_sample(store: ShardStore) -> dict:
    """scores.json and whether clip_image.npy is there, from the first built sample."""
    for shard in store.committed_shards("build"):
        with store.open("final", f"{shard:05d}.tar") as f, tarfile.open(fileobj=f) as t:
            names = t.getnames()
            first = next((n for n in names if n.endswith(".scores.json")), None)
            if first:
                key = first[:-len(".scores.json")]
                return {"scores": json.loads(t.extractfile(first).read()), "npy": f"{key}.clip_image.npy" in names}
    return {"scores": {}, "npy": False}


def card_data(store: ShardStore, n_built: int):
    """The card's front matter (huggingface_hub ``DatasetCardData``)."""
    from huggingface_hub import DatasetCardData

    first = _first_sample(store)
    types = {k: "string" if isinstance(v, str) else "int64" if isinstance(v, int) else "float64"
             for k, v in first["scores"].items() if v is not None}
    # one config: the Hub infers one builder for a whole repository, so the parquet tables
    # (their own folders, TABLE_DIRS) are loaded with load_dataset("parquet", data_files=...)
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": "final/*.tar"}]}]
    return DatasetCardData(
        pretty_name="mmloom interleaved image-text prompts", size_categories=[size_category(n_built)],
        task_categories=["text-to-image"], tags=["mmloom", "webdataset", "interleaved", "image-text"],
        configs=configs,
        dataset_info={"config_name": "default", "features": features(types, first["npy"])},
    )


def write_card(root: str, cfg: PipelineConfig) -> str:
    with reading(root):  # a damaged committed file: one line naming it
        return _write_card(root, cfg)


def _write_card(root: str, cfg: PipelineConfig) -> str:
    store = ShardStore(root)
    con = open_dataset(root)
    names = set(view_names(con))
    f = funnel(root)
    lines = ["# Dataset card", "", "**Licence**: not set. The images and captions belong to their owners; "
             "add `license:` to the front matter once you know the terms you may share them under.", "",
             f"Built by mmloom from `{', '.join(json.load(store.open('_commits', 'ingest.json'))['files'])}`.", ""]
    lines += ["## Funnel", "", "```", render_funnel(f)]
    lines += ["```", ""]
    built = dict(con.execute("SELECT status, count(*) FROM final GROUP BY 1").fetchall()) if "final" in names else {}
    for p in _plots(store, con, names):
        lines += [f"![{p}]({p})", ""]
    if "crops" in names:
        n_crops, n_person, n_head = con.execute("SELECT count(*), count(*) FILTER (is_person), count(head_rect) FROM crops").fetchall()[0]
        phrases = con.execute("SELECT lower(phrase), count(*) FROM crops GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10").fetchall()
        dropped: Counter = Counter()
        for rec in store.records("build"):
            dropped.update(rec.get("dropped_boxes", {}))
        boxes = con.execute("SELECT count(*) FROM detections").fetchall()[0][0] if "detections" in names else 0
        lines += ["## Crops", "", f"- {boxes} boxes detected, {n_crops} crops kept ({n_person} of people, {n_head} with a head crop)",
                  "- boxes dropped by rule: " + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"),
                  "- most frequent phrases: " + ", ".join(f"{p} ({c})" for p, c in phrases), ""]
    ex = _examples(store, cfg.build.card_examples)
    if ex:
        lines += ["## Example prompts", ""]
        for text, pic in ex:
            lines += [f"- `{text}`", f"  ![example]({pic})"]
        lines.append("")
    lines += ["## Loading", "", "Plain webdataset (images, JSON and text only: `pre=[]` and `post=[]` turn off webdataset's "
              "default decoders, which unpickle `.pyd`/`.pickle` members):", "", "```python", "import glob, json, webdataset as wds",
              *([] if store.is_local else ["import mmloom.train.data  # lets webdataset open object-store URLs through fsspec"]),
              f"tars = sorted(glob.glob({store.root + '/final/*.tar'!r}))" if store.is_local else
              f"tars = {[store.url('final', f'{s:05d}.tar') for s in store.committed_shards('build')]!r}",
              "ds = wds.WebDataset(tars, shardshuffle=False).decode(",
              "    'pil', wds.handle_extension('json', json.loads), wds.handle_extension('txt', bytes.decode), pre=[], post=[])",
              "for s in ds:",
              "    p = s['prompt.json']",
              "    crops = [s['crops.jpg'].crop(p['crops'][seg['crop']]['rect']) for seg in p['segments'] if seg['type'] == 'image']",
              "```", "", "Hugging Face datasets (every sample has the same members, so nothing is lost to schema inference):", "",
              "```python", "from datasets import load_dataset",
              f"ds = load_dataset('webdataset', data_files={{'train': {store.root + '/final/*.tar'!r}}}, split='train')",
              f"crops = load_dataset('parquet', data_files={store.root + '/crops/*.parquet'!r}, split='train')  # one row per crop",
              "```", ""]
    lines += ["## Config", "", "```yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).strip(), "```", ""]
    con.close()
    from huggingface_hub import DatasetCard

    data = card_data(store, built.get("built", 0))
    card = DatasetCard("---\n" + data.to_yaml() + "\n---\n" + "\n".join(lines))
    store.write_bytes("README.md", str(card).encode())
    return store.url("README.md")
