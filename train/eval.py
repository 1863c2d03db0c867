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
CLIP model the user names (``--clip``), and FID / KID against the held-out pictures
(``train/fid.py``: torchmetrics on the standard FID Inception, whose weights the user
gives with ``--inception`` or torch hub's cache holds; mmloom never downloads them, and
says so instead of printing a number).

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
from dataclasses import dataclass, field

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


# -- each family's own claim (issue 17 item 3) ----------------------------------------------
# One function per family, called by run_eval after the shared toy-world conditions; each
# returns {"scores": ..., "headline": {what, value, shuffled, chance} or None, "lines": [...],
# "images": {column: pictures}} (the pictures go into OUT/measures.png, not into eval.json).


@dataclass
class ToyEval:
    """What a family measure needs: the loaded run and the held-out toy samples."""

    family: object
    model: object
    samples: list[dict]
    expected: list[list[tuple[str, str]]]  # (colour, shape) of each sample's objects, left to right
    pictures: list  # the held-out pictures at the training resolution
    size: int
    steps: int | None
    guidance: float | None
    batch_size: int
    progress: bool
    perm: list[int]  # the shuffled baseline's derangement
    generic: dict = field(default_factory=dict)  # run_eval's pictures per condition (prompted, shuffled, unconditional)
    limit: int = 32  # samples per measure that needs several generations per prompt


def colour_preservation(images: list, sources: list[list[tuple[str, str]]]) -> float:
    """Fraction of the source pictures' objects whose colour is found in the same strip of
    the generated picture (Versatile Diffusion's image variation keeps the source's colours)."""
    return adherence_of(images, sources)["colour"]


def mix_fractions(images: list, text_objects: list[list[tuple[str, str]]], image_objects: list[list[tuple[str, str]]]) -> dict:
    """Dual-context blending, text naming one colour and the image showing another: of the
    objects whose colours differ between the two, the fraction found in the text's colour
    and the fraction found in the image's (same strip)."""
    from .analyze import find_objects

    text = image = n = 0
    for im, to, io in zip(images, text_objects, image_objects):
        for f, (tc, _ts), (ic, _is) in zip(find_objects(im, len(to)), to, io):
            if tc == ic:
                continue
            n += 1
            text += f is not None and f.colour == tc
            image += f is not None and f.colour == ic
    return {"text": round(text / max(n, 1), 4), "image": round(image / max(n, 1), 4), "objects": n}


def rises(values: list[float], tolerance: float = 0.0) -> bool:
    """Non-decreasing, allowing each step to fall by at most ``tolerance``."""
    return all(b >= a - tolerance for a, b in zip(values, values[1:]))


MIX_RATES = (0.0, 0.25, 0.5, 0.75, 1.0)


def captions_alone(ev: ToyEval, what: str) -> tuple[dict, dict]:
    """Pictures from each held-out caption alone, from a shuffled caption and from the empty
    text, and their toy adherence against the held-out sample's own caption."""
    captions = [s.get("txt") or "" for s in ev.samples]
    conds = {"prompted": [[c] for c in captions], "shuffled": [[captions[j]] for j in ev.perm], "unconditional": [[""]] * len(captions)}
    images = {k: ev.generic[k] if k == "unconditional" and k in ev.generic else  # the same prompt and seeds: already sampled
              generate_all(ev.family, ev.model, p, ev.steps, ev.guidance, ev.size, ev.batch_size, f"{what}, {k}", ev.progress)
              for k, p in conds.items()}
    return images, {k: adherence_of(v, ev.expected) for k, v in images.items()}


def versatile_measures(ev: ToyEval) -> dict:
    """Text-to-image adherence (the caption alone), image-variation colour preservation (the
    held-out picture alone), and the dual-context mix moving with the mixing rate (each
    caption with another sample's picture, rates 0 -> 1)."""
    fam, model, n = ev.family, ev.model, len(ev.samples)
    captions = [s.get("txt") or "" for s in ev.samples]
    gen = lambda prompts, what: generate_all(fam, model, prompts, ev.steps, ev.guidance, ev.size, ev.batch_size, what, ev.progress)  # noqa: E731
    t2i, t2i_scores = captions_alone(ev, "text-to-image")
    variation = gen([[p] for p in ev.pictures], "image variation")
    shuffled_sources = [ev.expected[j] for j in ev.perm]
    var_scores = {"own source": colour_preservation(variation, ev.expected),
                  "shuffled source": colour_preservation(variation, shuffled_sources),
                  "unconditional": colour_preservation(t2i["unconditional"], ev.expected)}
    k = min(n, ev.limit)
    texts, imgs = [[captions[i]] for i in range(k)], [ev.pictures[ev.perm[i]] for i in range(k)]
    mix, mix_images = {}, {}
    keep = model.cfg.mix_rate
    try:
        for r in MIX_RATES:
            model.cfg.mix_rate = r
            mix_images[r] = gen([[t[0], im] for t, im in zip(texts, imgs)], f"mix rate {r}")
            mix[str(r)] = mix_fractions(mix_images[r], ev.expected[:k], shuffled_sources[:k])
    finally:
        model.cfg.mix_rate = keep
    text_frac = [mix[str(r)]["text"] for r in MIX_RATES]
    p = t2i_scores["prompted"]["both"]
    lines = [f"text-to-image (the caption alone), colour and shape: {p:.3f}, shuffled {t2i_scores['shuffled']['both']:.3f}, "
             f"unconditional {t2i_scores['unconditional']['both']:.3f}, chance 0.062 (colour {t2i_scores['prompted']['colour']:.3f}, "
             f"shuffled {t2i_scores['shuffled']['colour']:.3f}, chance 0.25)",
             f"image variation, source colours kept: {var_scores['own source']:.3f}, a shuffled source's {var_scores['shuffled source']:.3f}, "
             f"unconditional {var_scores['unconditional']:.3f}, chance 0.25",
             f"dual context (text one colour, image another; {mix['0.0']['objects']} objects), text's colour at mix rate "
             + ", ".join(f"{r:g}: {mix[str(r)]['text']:.3f}" for r in MIX_RATES)
             + "; image's " + ", ".join(f"{r:g}: {mix[str(r)]['image']:.3f}" for r in MIX_RATES)
             + f"; rises with the rate: {'yes' if rises(text_frac) else 'no'}"]
    return {"scores": {"text_to_image": t2i_scores, "image_variation_colour": var_scores, "mix": mix,
                       "mix_text_fraction_rises": rises(text_frac)},
            "headline": {"what": "text-to-image adherence (colour and shape, the caption alone)", "value": p,
                         "shuffled": t2i_scores["shuffled"]["both"], "chance": 1 / 16},
            "lines": lines,
            "images": {"t2i": t2i["prompted"], "t2i shuffled": t2i["shuffled"], "variation": variation,
                       **{f"mix {r:g}": [*v, *[None] * (n - k)] for r, v in mix_images.items()}}}


def kandinsky_measures(ev: ToyEval) -> dict:
    """Text adherence through the prior then the decoder (the caption alone: the prior makes
    a CLIP image embedding from it, the decoder a picture from that and the caption), and the
    prior on its own: its embedding's cosine with the held-out picture's CLIP embedding, and
    how often that picture is the nearest of all (retrieval; chance 1/n)."""
    model, n = ev.model, len(ev.samples)
    captions = [s.get("txt") or "" for s in ev.samples]
    t2i, scores = captions_alone(ev, "prior then decoder")
    prior_scores = None
    prior = model._load_prior()
    if prior is not None:
        with torch.no_grad():
            emb = torch.cat([prior.prior_embed([c], seed=i) for i, c in enumerate(captions)]).float().cpu()
            true = model.clip.images([next(s[k] for k in IMAGE_KEYS if k in s) for s in ev.samples]).float().cpu()
        prior_scores = prior_agreement(emb, true, ev.perm)
    p = scores["prompted"]["both"]
    lines = [f"text through prior and decoder (the caption alone), colour and shape: {p:.3f}, shuffled {scores['shuffled']['both']:.3f}, "
             f"unconditional {scores['unconditional']['both']:.3f}, chance 0.062 (colour {scores['prompted']['colour']:.3f}, "
             f"shuffled {scores['shuffled']['colour']:.3f}, chance 0.25)"]
    if prior_scores:
        lines.append(f"prior alone: cosine with the picture's CLIP embedding {prior_scores['cosine']:.3f} (shuffled captions "
                     f"{prior_scores['cosine_shuffled']:.3f}); the picture nearest of {n}: {prior_scores['retrieval']:.3f} (chance {1 / n:.3f})")
    return {"scores": {"prior_then_decoder": scores, "prior": prior_scores},
            "headline": {"what": "text adherence through prior and decoder (colour and shape)", "value": p,
                         "shuffled": scores["shuffled"]["both"], "chance": 1 / 16},
            "lines": lines, "images": {"prior+decoder": t2i["prompted"], "shuffled": t2i["shuffled"], "unconditional": t2i["unconditional"]}}


def prior_agreement(predicted: torch.Tensor, true: torch.Tensor, perm: list[int]) -> dict:
    """The prior's embeddings [n, D] against the pictures' [n, D]: mean cosine with its own
    picture, with a shuffled one, and the fraction whose own picture is the most similar."""
    a = torch.nn.functional.normalize(predicted.float(), dim=-1)
    b = torch.nn.functional.normalize(true.float(), dim=-1)
    sim = a @ b.T
    own = sim.diagonal()
    return {"cosine": round(float(own.mean()), 4), "cosine_shuffled": round(float(sim[torch.arange(len(perm)), perm].mean()), 4),
            "retrieval": round(float((sim.argmax(dim=1) == torch.arange(len(perm))).float().mean()), 4)}


def restore_masks(boxes: list[list[tuple[float, float, float, float]]], size: int, patch: int, extra: int = 2,
                  seed: int = 0) -> list[np.ndarray]:
    """[size, size] bool masks, True where a picture is to be restored: a ``patch``-pixel
    square on the centre of each object's box (pixels of the picture at ``size``) and
    ``extra`` more at random places."""
    rng = np.random.default_rng(seed)
    out = []
    for bs in boxes:
        m = np.zeros((size, size), bool)
        centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in bs]
        centres += [tuple(rng.uniform(patch / 2, size - patch / 2, 2)) for _ in range(extra)]
        for cx, cy in centres:
            x, y = int(round(cx - patch / 2)), int(round(cy - patch / 2))
            m[max(0, y):y + patch, max(0, x):x + patch] = True
        out.append(m)
    return out


def restoration_errors(restored: list, truth: list, masks: list[np.ndarray]) -> dict:
    """Mean absolute error (0-1 per channel) over the masked pixels, and the largest
    difference (0-255) over the unmasked ones (constrained restoration keeps them exactly)."""
    masked, unmasked = [], 0
    for r, t, m in zip(restored, truth, masks):
        a = np.asarray(r.convert("RGB"), np.int16)
        b = np.asarray(t.convert("RGB"), np.int16)
        masked.append(np.abs(a - b)[m].mean() / 255.0)
        if (~m).any():
            unmasked = max(unmasked, int(np.abs(a - b)[~m].max()))
    return {"masked_error": round(float(np.mean(masked)), 4), "unmasked_max_difference": unmasked}


def objects_restored(restored: list, masks_per_object: list[list[np.ndarray]], colours: list[list[str]]) -> float:
    """Fraction of masked object centres drawn back in the object's colour: at least half of
    the patch's pixels labelled with it by the analyzer's colour rule (chance: about 0.25)."""
    from ..testkit.toyworld import COLOURS
    from .analyze import colour_labels

    names = list(COLOURS)
    hit = n = 0
    for im, ms, cs in zip(restored, masks_per_object, colours):
        lab = colour_labels(np.asarray(im.convert("RGB")))
        for m, c in zip(ms, cs):
            n += 1
            hit += bool((lab[m] == names.index(c)).mean() >= 0.5)
    return round(hit / max(n, 1), 4)


def fill(truth, source, mask: np.ndarray):
    """``truth`` with its masked pixels taken from ``source`` (a picture or an RGB colour)."""
    from PIL import Image

    a = np.asarray(truth.convert("RGB")).copy()
    a[mask] = np.asarray(source.convert("RGB"))[mask] if hasattr(source, "convert") else np.asarray(source, np.uint8)
    return Image.fromarray(a)


def label_accuracy(images: list, labels: list[str]) -> dict:
    """Labels generated with pictures: fraction whose label ("red circle") names the
    colour, the shape, and both of the leftmost object found in its picture (the toy
    world's first crop, the one an image_label sample is labelled with; chance 0.25, 0.25, 1/16)."""
    from ..testkit.toyworld import OBJECTS
    from .analyze import find_objects

    col = shp = both = 0
    for im, lab in zip(images, labels):
        words = lab.split()
        c, s = (words[0], words[-1]) if len(words) == 2 else ("", "")
        f = find_objects(im, OBJECTS)[0]
        col += f is not None and f.colour == c
        shp += f is not None and f.shape == s
        both += f is not None and f.colour == c and f.shape == s
    n = max(len(labels), 1)
    return {"colour": round(col / n, 4), "shape": round(shp / n, 4), "both": round(both / n, 4)}


def object_boxes(sample: dict, size: int) -> list[tuple[float, float, float, float]]:
    """The sample's crop boxes (prompt.json, left to right) in pixels of the picture at ``size``."""
    main = next(sample[k] for k in IMAGE_KEYS if k in sample)
    scale = size / max(main.size)
    boxes = [g["box"] for g in sample["prompt.json"].get("segments", []) if g.get("type") == "image" and g.get("box")]
    return sorted(tuple(float(v) * scale for v in b) for b in boxes)


def mtdiffusion_measures(ev: ToyEval) -> dict:
    """masked_image: constrained restoration of held-out pictures with a patch on each
    object and two at random (masked-pixel error, unmasked pixels unchanged, object colours
    restored) against filling the patches with the picture's mean colour, with another
    picture's pixels (shuffled) and with an unconditional sample. image_label: labels
    generated with pictures (joint label accuracy), and pictures from a given label."""
    model, k = ev.model, min(len(ev.samples), ev.limit)
    from PIL import Image
    from tqdm.auto import tqdm

    if model.cfg.task == "masked_image":
        patch = model.cfg.patch_size
        boxes = [object_boxes(s, ev.size) for s in ev.samples[:k]]
        masks = restore_masks(boxes, ev.size, patch)
        per_object = [[m[0] for m in (restore_masks([[b]], ev.size, patch, extra=0) for b in bs)] for bs in boxes]  # one per object
        colours = [[c for c, _s in e] for e in ev.expected[:k]]
        truth = ev.pictures[:k]
        restored = []
        for i in tqdm(range(k), desc="eval: restoration", disable=not ev.progress, leave=False):
            masked = fill(truth[i], (0, 0, 0), masks[i])
            restored += model.generate([[masked]], seeds=[i], size=ev.size, restore=True,
                                       mask=Image.fromarray((masks[i] * 255).astype(np.uint8)))
        uncond = model.generate([[""]] * k, seeds=list(range(k)), size=ev.size) if not ev.generic.get("unconditional") \
            else ev.generic["unconditional"][:k]
        perm = [j % k for j in ev.perm[:k]] if k == len(ev.samples) else derangement(k)
        baselines = {
            "mean colour": [fill(t, np.asarray(t.convert("RGB"))[~m].mean(0).round(), m) for t, m in zip(truth, masks)],
            "shuffled picture": [fill(truth[i], truth[perm[i]], masks[i]) for i in range(k)],
            "unconditional sample": [fill(truth[i], uncond[i], masks[i]) for i in range(k)],
        }
        scores = {"restored": {**restoration_errors(restored, truth, masks), "objects_restored": objects_restored(restored, per_object, colours)}}
        for name, ims in baselines.items():
            scores[name] = {**restoration_errors(ims, truth, masks), "objects_restored": objects_restored(ims, per_object, colours)}
        r = scores["restored"]
        lines = [f"masked-patch restoration ({k} pictures, {patch} px patches on each object and 2 at random): masked-pixel error "
                 f"{r['masked_error']:.3f} (mean colour {scores['mean colour']['masked_error']:.3f}, shuffled picture "
                 f"{scores['shuffled picture']['masked_error']:.3f}, unconditional sample {scores['unconditional sample']['masked_error']:.3f}); "
                 f"unmasked pixels: largest difference {r['unmasked_max_difference']} (0: unchanged)",
                 f"object colour restored in the masked object patches: {r['objects_restored']:.3f} (mean colour "
                 f"{scores['mean colour']['objects_restored']:.3f}, shuffled picture {scores['shuffled picture']['objects_restored']:.3f}, "
                 f"unconditional sample {scores['unconditional sample']['objects_restored']:.3f}, chance about 0.25)"]
        return {"scores": {"restoration": scores},
                "headline": {"what": "object colour restored in masked object patches", "value": r["objects_restored"],
                             "shuffled": scores["shuffled picture"]["objects_restored"], "chance": 0.25},
                "lines": lines,
                "images": {"masked": [fill(t, (0, 0, 0), m) for t, m in zip(truth, masks)], "restored": restored,
                           "mean colour": baselines["mean colour"], "unconditional": uncond}}
    if model.cfg.task != "image_label":
        return {"scores": {}, "headline": None, "lines": [f"no MT-Diffusion measure for task {model.cfg.task}"], "images": {}}
    joint, labels = [], []
    for i in tqdm(range(k), desc="eval: pictures with labels", disable=not ev.progress, leave=False):
        im, lab = model.generate([[""]], seeds=[i], size=ev.size, return_labels=True)
        joint += im
        labels += lab
    perm = derangement(k)
    acc = label_accuracy(joint, labels)
    acc_shuffled = label_accuracy([joint[perm[i]] for i in range(k)], labels)
    given = [f"{c} {s}" for c, s in (e[0] for e in ev.expected[:k])]
    cond = []
    for i in tqdm(range(k), desc="eval: pictures from labels", disable=not ev.progress, leave=False):
        cond += model.generate([[f"a {given[i]}"]], seeds=[i], size=ev.size)
    cond_acc = label_accuracy(cond, given)
    cond_shuffled = label_accuracy(cond, [given[perm[i]] for i in range(k)])
    lines = [f"labels generated with pictures ({k}): the label names the leftmost object found, colour and shape {acc['both']:.3f} "
             f"(colour {acc['colour']:.3f}, shape {acc['shape']:.3f}); shuffled pictures {acc_shuffled['both']:.3f}, chance 0.062; "
             f"labels generated: {len(set(labels))} distinct, 'other' {labels.count('other')}",
             f"pictures from a given label: the leftmost object is the label's, colour and shape {cond_acc['both']:.3f} "
             f"(colour {cond_acc['colour']:.3f}), shuffled labels {cond_shuffled['both']:.3f}, chance 0.062"]
    return {"scores": {"joint": acc, "joint_shuffled": acc_shuffled, "labels": labels, "from_label": cond_acc,
                       "from_label_shuffled": cond_shuffled},
            "headline": {"what": "joint label accuracy (the generated label names the generated picture's object)",
                         "value": acc["both"], "shuffled": acc_shuffled["both"], "chance": 1 / 16},
            "lines": lines, "images": {"joint": joint, "from label": cond}}


FAMILY_MEASURES = {"versatile": versatile_measures, "kandinsky": kandinsky_measures, "mtdiffusion": mtdiffusion_measures}


def run_eval(run: str, shards: str | None = None, n: int = 64, out: str | None = None, steps: int | None = None,
             guidance: float | None = None, clip: str | None = None, batch_size: int = 16, progress: bool = True,
             ablations: bool = False, measures: bool = True, conditions: tuple = CONDITIONS, inception: str | None = None,
             echo=print) -> dict:
    from .fid import describe, fid_kid, fid_note, find_inception
    from .prompts import PromptBuilder, square
    from .sample import find_run, load_for_sampling

    if n < 2:
        raise UserError(f"--n must be at least 2 (the shuffled baseline gives each prompt to another sample; got {n})")
    inception = find_inception(inception)  # before any sampling: a wrong path fails at once
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
    conds = {k: v for k, v in conds.items() if k in conditions}
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
    columns: dict = {}
    result: dict = {"run": run_dir, "checkpoint": ck, "family": family.name, "shards": shards or cfg.data.shards,
                    "held_out": heldout, "n": n, "resolution": size, "steps": s_steps, "guidance": s_guid}
    refs = [square(next(s[k] for k in IMAGE_KEYS if k in s), size) for s in samples]  # the held-out pictures
    if all(expected):
        scores = {k: adherence_of(images[k], expected) for k in conds}
        scores["held-out pictures"] = adherence_of(refs, expected)
        if (ae := autoencoded(model, refs, size)):
            scores["through the autoencoder"] = adherence_of(ae, expected)
        result["toy"] = {"scores": scores, "chance": {"colour": 0.25, "shape": 0.25, "both": 1 / 16},
                         "ratio_to_shuffled": round(scores["prompted"]["both"] / max(scores["shuffled"]["both"], 1e-9), 2)
                         if "prompted" in scores and "shuffled" in scores else None}
        echo(f"  {'adherence (toy world)':<26} {'colour':>7} {'shape':>7} {'both':>7}")
        for k, v in [*scores.items(), ("chance", result["toy"]["chance"])]:
            echo(f"  {k:<26} {v['colour']:>7.3f} {v['shape']:>7.3f} {v['both']:>7.3f}")
        if result["toy"]["ratio_to_shuffled"] is not None:
            echo(f"  prompted / shuffled (both): {result['toy']['ratio_to_shuffled']:.2f}x")
        if measures and (measure := FAMILY_MEASURES.get(family.name)):
            ev = ToyEval(family, model, samples, expected, refs, size, steps, guidance, batch_size, progress, perm, generic=images)
            m = measure(ev)
            columns = m.pop("images")
            result["measures"] = m
            for line in m["lines"]:
                echo("  " + line)
    else:
        echo("  not a toy world (some captions name no colour and shape): toy adherence not measured")
    if clip:
        result["clip_score"] = {k: round(clip_scores(clip, images[k], captions), 4) for k in CONDITIONS if k in images}
        echo("  CLIP score (cosine, with its own caption): " + ", ".join(f"{k} {v:.4f}" for k, v in result["clip_score"].items()))
    else:
        result["clip_score"] = None
        echo("  CLIP score not computed: give --clip MODEL (ARCH/TAG, hf-hub:REPO or a directory with the weights)")
    if inception:
        result["fid_kid"] = fid_kid(refs, {k: images[k] for k in CONDITIONS if k in images}, inception)
        echo("  " + describe(result["fid_kid"]))
    else:
        result["fid_kid"] = fid_note()
        echo("  " + result["fid_kid"])
    out = os.path.abspath(out or os.path.join(run_dir, "eval"))
    os.makedirs(out, exist_ok=True)
    result["grid"] = picture_grid(samples, images, captions, os.path.join(out, "grid.png"))
    if result.get("measures") and columns:
        result["measures"]["grid"] = picture_grid(samples, columns, captions, os.path.join(out, "measures.png"))
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    echo(f"[eval] {os.path.join(out, 'eval.json')}, picture grid {result['grid']}")
    return result
