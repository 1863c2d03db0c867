"""`mmloom eval RUN [--shards DIR] [--n N]`: does the trained model follow its prompts?

Samples the run's model (its family's ``generate``, the run's sampling defaults) on ``n``
held-out prompts, built from final/ shards by the run's own prompt builder (no
augmentation), under three conditions with the same seeds:

* ``prompted``: each sample's own prompt;
* ``shuffled``: another sample's prompt (a derangement): what a model that ignores the
  prompt's content but learned the data's look scores;
* ``unconditional``: the empty prompt.

Toy world prompts (every caption names colours and shapes: testkit/toyworld.py) are
scored by a check that does not learn (``train/analyze.py``): the fraction of named
objects whose colour, shape, and both are found where the caption puts them (k-th named,
k-th strip from the left), always against the held-out sample's own caption. Two ceilings
are measured too: the held-out pictures themselves at the training resolution, and the
same pictures through the run's frozen autoencoder (a model cannot score above what its
decoder can draw). Real data: CLIP score of each picture against its caption with the
CLIP model the user names (``--clip``); FID/KID need Inception weights, which mmloom
never downloads: it says so instead of printing a number.

``ablations`` (toy world, prompts with crops: MUMU, M-VADER) adds two more: ``crops only``
(the colour and shape words taken out of the text, so only the crops name the objects)
and ``words only`` (the crops taken out).

Writes ``OUT/eval.json`` (every figure) and ``OUT/grid.png`` (per row: the caption, the
held-out picture, its crops, then the prompted, shuffled and unconditional samples).
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from mmloom.errors import UserError

CONDITIONS = ("prompted", "shuffled", "unconditional")
ABLATIONS = ("crops only", "words only")  # toy world, prompts with images (MUMU, M-VADER: section 4's crops)
IMAGE_KEYS = ("jpg", "png", "webp")
MAX_CROPS = 8  # crop members read per sample (build.max_crops is at most this in practice)


def heldout_samples(spec: str, n: int, allow_pipe: bool = False) -> list[dict]:
    """The first ``n`` decoded samples of the final/ shards ``spec`` (safely: train/data.py's decoders)."""
    from .data import read_members, shard_urls

    only = {*IMAGE_KEYS, "txt", "prompt.json", "crops.jpg", *(f"crop{i}.jpg" for i in range(MAX_CROPS))}
    out = []
    for s in read_members(shard_urls(spec, allow_pipe), only):
        if any(k in s for k in IMAGE_KEYS) and "prompt.json" in s:
            out.append(s)
        if len(out) >= n:
            break
    return out


def derangement(n: int, seed: int = 0) -> list[int]:
    """A permutation with no fixed point (n >= 2): one random cycle through every index."""
    order = np.random.default_rng(seed).permutation(n)
    perm = [0] * n
    for j in range(n):
        perm[order[j]] = int(order[(j + 1) % n])
    return perm


def without_names(parts: list) -> list:
    """The prompt with the toy words (colours, shapes) taken out of its text: only the crops name the objects."""
    from ..testkit.toyworld import COLOURS, SHAPES

    names = {*COLOURS, *SHAPES}
    return [p if not isinstance(p, str) else " ".join(w for w in p.split(" ") if w.lower() not in names) for p in parts]


def toy_objects(sample: dict) -> list[tuple[str, str]]:
    from ..testkit.toyworld import parse_caption

    return parse_caption(sample.get("txt") or "")


def generate_all(family, model, prompts: list[list], steps, guidance, size: int, batch_size: int, what: str,
                 progress: bool = True) -> list:
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad(), tqdm(total=len(prompts), desc=f"eval: {what}", disable=not progress, leave=False) as bar:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            out += family.generate(model, batch, steps, guidance, list(range(i, i + len(batch))), size)
            bar.update(len(batch))
    return out


def autoencoded(model, images: list, size: int) -> list:
    """The pictures after the run's frozen autoencoder (encode, decode): what its decoder can draw."""
    from .diffusion import to_pil

    ae = getattr(model, "ae", None)
    if ae is None:
        return []
    x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    with torch.no_grad():
        return to_pil(ae.decode(ae.encode(x)))


def adherence_of(images: list, expected: list[list[tuple[str, str]]]) -> dict[str, float]:
    from .analyze import adherence

    scores = [adherence(im, e) for im, e in zip(images, expected)]
    return {k: round(float(np.mean([s[k] for s in scores])), 4) for k in ("colour", "shape", "both")}


def clip_scores(ref: str, images: list, captions: list[str]) -> float:
    """Mean cosine similarity of each picture with its caption (CLIP score / 100)."""
    from mmloom.clip import ClipEmbedder

    clip = ClipEmbedder(ref)
    with torch.no_grad():
        return float((clip.images(images) * clip.texts(captions)).sum(-1).mean())


def fid_note() -> str:
    """FID/KID need Inception weights that nothing here downloads: say what is missing."""
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        return "FID/KID not computed: torchmetrics (or clean-fid) is not installed, and their Inception weights cannot be downloaded here"
    return ("FID/KID not computed: torchmetrics is installed but its Inception weights are fetched on first use, "
            "which mmloom never does; place them in torch's hub cache to compute FID/KID with torchmetrics yourself")


def picture_grid(samples: list[dict], images: dict[str, list], captions: list[str], path: str, rows: int = 8, cell: int = 96) -> str:
    from PIL import Image, ImageDraw

    from .prompts import resolve_segments, square

    rows = min(rows, len(samples))
    crop_images = [[g["image"] for g in resolve_segments(s) if g["type"] == "image"] for s in samples[:rows]]
    crops = max((len(c) for c in crop_images), default=0)
    conds = list(images)
    cols = 1 + crops + len(conds)
    head = 16
    grid = Image.new("RGB", (cols * cell, 18 + rows * (cell + head)), "white")
    d = ImageDraw.Draw(grid)
    labels = ["held-out", *[f"crop {i}" for i in range(crops)], *conds]
    for c, lab in enumerate(labels):
        d.text((c * cell + 3, 3), lab, fill="black")
    for r in range(rows):
        y = 18 + r * (cell + head)
        d.text((3, y + 2), captions[r][:cols * cell // 6], fill="black")
        s = samples[r]
        main = next(s[k] for k in IMAGE_KEYS if k in s)
        tiles = [main, *crop_images[r]]
        tiles += [None] * (1 + crops - len(tiles)) + [images[k][r] for k in conds]
        for c, im in enumerate(tiles):
            if im is not None:
                grid.paste(square(im, cell) if im.size[0] != im.size[1] else im.resize((cell, cell), Image.NEAREST), (c * cell, y + head))
    grid.save(path)
    return path


def run_eval(run: str, shards: str | None = None, n: int = 64, out: str | None = None, steps: int | None = None,
             guidance: float | None = None, clip: str | None = None, batch_size: int = 16, progress: bool = True,
             ablations: bool = False, echo=print) -> dict:
    from .prompts import PromptBuilder, square
    from .sample import find_run, load_for_sampling

    if n < 2:
        raise UserError(f"--n must be at least 2 (the shuffled baseline gives each prompt to another sample; got {n})")
    run_dir, ck = find_run(run)
    family, model, cfg = load_for_sampling(run)
    heldout = shards is not None
    samples = heldout_samples(shards or cfg.data.shards, n, cfg.data.allow_pipe)
    if len(samples) < 2:
        raise UserError(f"{shards or cfg.data.shards}: fewer than 2 samples in its final/ shards")
    n = len(samples)
    builder = PromptBuilder(cfg.prompt.model_copy(update={"augment_prob": 0.0, "structure": False, "head_prob": 0.0}))
    prompts = [builder(s, random.Random(i)).parts for i, s in enumerate(samples)]
    captions = [s.get("txt") or "" for s in samples]
    perm = derangement(n)
    conds = {"prompted": prompts, "shuffled": [prompts[j] for j in perm], "unconditional": [[""]] * n}
    expected = [toy_objects(s) for s in samples]
    if ablations and all(expected) and all(any(not isinstance(p, str) for p in q) for q in prompts):
        conds["crops only"] = [without_names(q) for q in prompts]  # does the picture follow the crops?
        conds["words only"] = [[p for p in q if isinstance(p, str)] for q in prompts]  # ... or the words?
    size = cfg.data.resolution
    s_steps = steps or cfg.model.sampling.steps
    s_guid = guidance if guidance is not None else cfg.model.sampling.guidance
    echo(f"[eval] {family.name} run {run_dir} ({os.path.basename(ck)}): {n} prompts from "
         f"{shards if heldout else cfg.data.shards + ' (the training shards: NOT held out)'}, "
         f"{cfg.model.sampling.sampler} {s_steps} steps, guidance {s_guid}")
    images = {k: generate_all(family, model, p, steps, guidance, size, batch_size, k, progress) for k, p in conds.items()}
    result: dict = {"run": run_dir, "checkpoint": ck, "family": family.name, "shards": shards or cfg.data.shards,
                    "held_out": heldout, "n": n, "resolution": size, "steps": s_steps, "guidance": s_guid}
    if all(expected):
        refs = [square(next(s[k] for k in IMAGE_KEYS if k in s), size) for s in samples]
        scores = {k: adherence_of(images[k], expected) for k in conds}
        scores["held-out pictures"] = adherence_of(refs, expected)
        if (ae := autoencoded(model, refs, size)):
            scores["through the autoencoder"] = adherence_of(ae, expected)
        result["toy"] = {"scores": scores, "chance": {"colour": 0.25, "shape": 0.25, "both": 1 / 16},
                         "ratio_to_shuffled": round(scores["prompted"]["both"] / max(scores["shuffled"]["both"], 1e-9), 2)}
        echo(f"  {'adherence (toy world)':<26} {'colour':>7} {'shape':>7} {'both':>7}")
        for k, v in [*scores.items(), ("chance", result["toy"]["chance"])]:
            echo(f"  {k:<26} {v['colour']:>7.3f} {v['shape']:>7.3f} {v['both']:>7.3f}")
        echo(f"  prompted / shuffled (both): {result['toy']['ratio_to_shuffled']:.2f}x")
    else:
        echo("  not a toy world (some captions name no colour and shape): toy adherence not measured")
    if clip:
        result["clip_score"] = {k: round(clip_scores(clip, images[k], captions), 4) for k in CONDITIONS}
        echo("  CLIP score (cosine, with its own caption): " + ", ".join(f"{k} {v:.4f}" for k, v in result["clip_score"].items()))
    else:
        result["clip_score"] = None
        echo("  CLIP score not computed: give --clip MODEL (ARCH/TAG, hf-hub:REPO or a directory with the weights)")
    result["fid_kid"] = fid_note()
    echo("  " + result["fid_kid"])
    out = os.path.abspath(out or os.path.join(run_dir, "eval"))
    os.makedirs(out, exist_ok=True)
    result["grid"] = picture_grid(samples, images, captions, os.path.join(out, "grid.png"))
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    echo(f"[eval] {os.path.join(out, 'eval.json')}, picture grid {result['grid']}")
    return result
