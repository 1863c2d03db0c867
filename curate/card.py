"""The dataset card, DIR/README.md: the funnel from metadata rows to final samples,
score histograms, crop statistics, example prompts (pictured), and the config used."""

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


def write_card(root: str, cfg: PipelineConfig) -> str:
    with reading(root):  # a damaged committed file: one line naming it
        return _write_card(root, cfg)


def _write_card(root: str, cfg: PipelineConfig) -> str:
    store = ShardStore(root)
    con = open_dataset(root)
    names = set(view_names(con))
    f = funnel(root)
    lines = ["# Dataset card", "", f"Built by mmloom from `{', '.join(json.load(store.open('_commits', 'ingest.json'))['files'])}`.", ""]
    lines += ["## Funnel", "", "```", render_funnel(f)]
    if "final" in names:
        built = dict(con.execute("SELECT status, count(*) FROM final GROUP BY 1").fetchall())
        lines.append(f"  FINAL (built)          {built.get('built', 0):>9}   ({built.get('too_few_crops', 0)} selected samples had too few crops)")
    lines += ["```", ""]
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
    lines += ["## Loading", "", "```python", "import json, webdataset as wds",
              *([] if store.is_local else ["import mmloom.train.data  # lets webdataset open object-store URLs through fsspec"]),
              f"ds = wds.WebDataset({store.root + '/final/{00000..' + format(max(store.committed_shards('build') or [0]), '05d') + '}.tar'!r}).decode(",
              "    'pil', wds.handle_extension('json', json.loads), wds.handle_extension('txt', bytes.decode),",
              "    pre=[], post=[])  # never webdataset's default decoders: they unpickle .pyd/.pickle members",
              "for s in ds:  # s['jpg'], s['txt'], s['prompt.json']['segments'], s['crop0.jpg'], ...", "    break", "```", ""]
    lines += ["## Config", "", "```yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).strip(), "```", ""]
    con.close()
    store.write_bytes("README.md", "\n".join(lines).encode())
    return store.url("README.md")
