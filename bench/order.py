"""Does a run put the named colours where the prompt puts them, or only draw them somewhere?

For each held-out toy prompt (the run's own prompt builder, no augmentation) the run's
samples are read by the toy analyzer (train/analyze.py): the fraction of named objects
whose colour is found in its own half (eval's colour adherence), in the other half, and
anywhere; and, over captions that name two different colours, own half against swapped.
A model that learned which colours a prompt names but not their order scores the same
own and swapped (bench/learns.py's runs: README "Does it learn?").

    python bench/order.py RUN --shards TOY_HELDOUT_DIR [--n 64] [--words-only]
"""

from __future__ import annotations

import argparse
import random


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained run (or one of its checkpoints)")
    ap.add_argument("--shards", required=True, help="held-out toy world (mmloom toyworld --seed 1)")
    ap.add_argument("--n", type=int, default=64, help="held-out prompts")
    ap.add_argument("--words-only", action="store_true", help="take the crops out of the prompts")
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


if __name__ == "__main__":
    main()
