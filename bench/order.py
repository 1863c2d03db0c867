"""Does a run put the named colours where the prompt puts them, or only draw them somewhere?

For each held-out toy prompt (the run's own prompt builder, no augmentation) the run's
samples are read by the toy analyzer (train/analyze.py): the fraction of named objects
whose colour is found in its own half (eval's colour adherence), in the other half, and
anywhere; and, over captions that name two different colours, own half against swapped.
A model that learned which colours a prompt names but not their order scores the same
own and swapped (bench/learns.py's runs: README "Does it learn?"). ``--probe`` then asks
whether the order is in the run's text encoder at all: a linear probe on its hidden state
at each colour word of toy captions, fit on 400 captions and scored on 200 others, for
"first or second named" (and, as a check, which colour).

    python bench/order.py RUN --shards TOY_HELDOUT_DIR [--n 64] [--words-only] [--probe]
"""

from __future__ import annotations

import argparse
import random


def probe(model) -> dict[str, float]:
    """Held-out accuracy of linear probes on the encoder's hidden state at each colour word:
    its position in the caption (first or second named) and the colour itself."""
    import torch

    from mmloom.testkit.toyworld import COLOURS, render_scene

    names = list(COLOURS)

    def features(seeds):
        captions = [render_scene(s, size=32).caption for s in seeds]
        with torch.no_grad():
            h, _mask = model.encoder([[c] for c in captions])
        tok = model.encoder.processor.tokenizer
        x, pos, col = [], [], []
        for b, row in enumerate(model.encoder.last_input_ids.tolist()):
            k = 0
            for j, t in enumerate(row):
                w = tok.convert_ids_to_tokens(t)
                if w in COLOURS:
                    x.append(h[b, j].float())
                    pos.append(k)
                    col.append(names.index(w))
                    k += 1
        return torch.stack(x), torch.tensor(pos), torch.tensor(col)

    def fit(xtr, ytr, xte, yte, n):
        torch.manual_seed(0)
        lin = torch.nn.Linear(xtr.shape[1], n)
        opt = torch.optim.Adam(lin.parameters(), 1e-2)
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        for _ in range(500):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin((xtr - mu) / sd), ytr).backward()
            opt.step()
        return round(float((lin((xte - mu) / sd).argmax(-1) == yte).float().mean()), 3)

    xa, pa, ca = features(range(0, 400))
    xb, pb, cb = features(range(5000, 5200))  # other captions
    return {"position": fit(xa, pa, xb, pb, 2), "colour": fit(xa, ca, xb, cb, len(names))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained run (or one of its checkpoints)")
    ap.add_argument("--shards", required=True, help="held-out toy world (mmloom toyworld --seed 1)")
    ap.add_argument("--n", type=int, default=64, help="held-out prompts")
    ap.add_argument("--words-only", action="store_true", help="take the crops out of the prompts")
    ap.add_argument("--probe", action="store_true", help="also probe the text encoder's states for the word order")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from mmloom.train.analyze import find_objects
    from mmloom.train.eval import generate_all, heldout_samples, toy_objects
    from mmloom.train.prompts import PromptBuilder
    from mmloom.train.sample import load_for_sampling

    family, model, cfg = load_for_sampling(a.run)
    samples = heldout_samples(a.shards, a.n)
    builder = PromptBuilder(cfg.prompt.model_copy(update={"augment_prob": 0.0, "structure": False, "head_prob": 0.0}))
    prompts = [builder(s, random.Random(i)).parts for i, s in enumerate(samples)]  # the seeds eval uses
    if a.words_only:
        prompts = [[p for p in q if isinstance(p, str)] for q in prompts]
    images = generate_all(family, model, prompts, None, None, cfg.data.resolution, 16, "prompted", False)
    own = other = anywhere = total = 0
    own2 = swapped2 = pairs = 0
    for im, s in zip(images, samples):
        expected = toy_objects(s)
        colours = [f.colour if f else None for f in find_objects(im, len(expected))]
        for k, (c, _shape) in enumerate(expected):
            total += 1
            own += colours[k] == c
            other += any(colours[j] == c for j in range(len(expected)) if j != k)
            anywhere += c in colours
        if len(expected) == 2 and expected[0][0] != expected[1][0]:
            pairs += 1
            own2 += (colours[0] == expected[0][0]) + (colours[1] == expected[1][0])
            swapped2 += (colours[0] == expected[1][0]) + (colours[1] == expected[0][0])
    print(f"{a.run}: {len(samples)} prompts{' (words only)' if a.words_only else ''}: named colour in its own half "
          f"{own / total:.3f}, in the other half {other / total:.3f}, anywhere {anywhere / total:.3f}")
    if pairs:
        print(f"  captions naming two colours ({pairs}): own half {own2 / (2 * pairs):.3f}, swapped {swapped2 / (2 * pairs):.3f}")
    if a.probe:
        p = probe(model)
        print(f"  linear probe on the text encoder's state at each colour word (held-out captions): "
              f"first or second named {p['position']:.3f} (chance 0.5), which colour {p['colour']:.3f} (chance 0.25)")


if __name__ == "__main__":
    main()
