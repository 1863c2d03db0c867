"""Does it learn? Train a family on the curated toy world and measure adherence.

Builds two toy worlds with the real pipeline (`mmloom toyworld`: training, seed 0, and
held out, seed 1), the tiny models of the family's tiny config with two changes the toy
world needs (a VLM whose word-level tokenizer knows the toy words, and tiny:vae's
architecture trained for a few minutes to reconstruct toy pictures: a random-weight
decoder cannot draw anything, whatever the UNet learns), trains the family's tiny config
for at most ``--minutes`` of wall-clock time (in chunks; the loop resumes from its
checkpoint), then runs `mmloom eval` on the held-out world and prints adherence next to
chance and the shuffled-prompt and unconditional baselines.

Goal (issue 17): adherence >= 0.8 where chance <= 0.25, and >= 3x the shuffled baseline.

    python bench/learns.py --family mumu --minutes 15                 # CPU
    python bench/learns.py --family mumu --minutes 2 --train-n 128    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import time


def toy_world(path: str, seed: int, n: int, clip: str) -> str:
    """The toy world curated with ``clip`` as the score stage's CLIP (its stored embeddings)."""
    from mmloom.curate.toyworld import run_toyworld

    mark = os.path.join(path, "learns-clip.txt")
    if os.path.exists(os.path.join(path, "_commits", "build")) and os.path.exists(mark) and open(mark).read() == clip:
        print(f"[learns] reusing toy world {path}")
        return path
    run_toyworld(path, seed=seed, n=n, progress=False, echo=lambda s: print(s) if s.startswith("[") else None, clip=clip)
    with open(mark, "w") as f:
        f.write(clip)
    return path


def models(work: str, resolution: int, vae_seconds: float, clip_seconds: float) -> dict:
    """A VLM and a multilingual text encoder (Kandinsky's decoder) whose tokenizers know the
    toy words, the toy autoencoder (factor 4: 8x8 latents at 32 px) and the toy CLIP
    (tiny:clip trained contrastively on toy pictures and captions: the score stage's, so the
    shards store its embeddings, and Versatile Diffusion's and Kandinsky's encoder)."""
    from mmloom.testkit.tiny_train import TINY_WORDS, make_tiny_mclip, make_tiny_vlm
    from mmloom.testkit.toyworld import WORDS, make_toy_clip, make_toy_vae

    clip = os.path.join(work, "models", "toy-clip")
    if not os.path.exists(os.path.join(clip, "toy-clip-done")):
        make_toy_clip(clip, seconds=clip_seconds, echo=print)
        open(os.path.join(clip, "toy-clip-done"), "w").close()

    vlm = os.path.join(work, "models", "toy-vlm")
    if not os.path.exists(os.path.join(vlm, "config.json")):
        make_tiny_vlm(vlm, sorted(set(TINY_WORDS) | set(WORDS)), image_size=64)
    mclip = os.path.join(work, "models", "toy-mclip")
    if not os.path.exists(os.path.join(mclip, "config.json")):
        make_tiny_mclip(mclip, sorted(set(TINY_WORDS) | set(WORDS)))
    vae = os.path.join(work, "models", f"toy-vae-{resolution}")
    if not os.path.exists(os.path.join(vae, "config.json")):
        make_toy_vae(vae, resolution, seconds=vae_seconds, factor=4 if resolution <= 32 else 8, echo=print)
    return {"vlm": vlm, "mclip": mclip, "vae": vae, "clip": clip, "resolution": resolution}


# family -> the tiny configs trained one after the other (Kandinsky: the prior, then the decoder that samples through it)
STAGES = {"mumu": ["mumu-tiny"], "mvader": ["mvader-tiny"], "versatile": ["versatile-tiny"],
          "kandinsky": ["kandinsky-prior-tiny", "kandinsky-decoder-tiny"], "mtdiffusion": ["mtdiffusion-tiny"]}


def overrides(family: str, m: dict, config: str = "", task: str = "masked_image", zero_weight: bool = False) -> dict:
    over = {"data.resolution": m["resolution"]}
    if config != "kandinsky-prior-tiny":  # the prior has no autoencoder
        over.update({"model.autoencoder.path": m["vae"], "model.autoencoder.subfolder": None})
    if family in ("mumu", "mvader"):
        over["model.encoder.path"] = m["vlm"]
    if family in ("versatile", "kandinsky"):  # the toy CLIP: the score stage's, whose embeddings the shards store
        over["model.encoder.path"] = m["clip"]
    if family == "versatile":  # the two image flows: what the image measures read (no text VAE to train)
        over.update({"model.flows": ["text_to_image", "image_variation"], "model.text_vae": ""})
    if config == "kandinsky-decoder-tiny":
        over.update({"model.autoencoder.type": "kl", "model.text_encoder.path": m["mclip"]})
    if family == "mtdiffusion":
        from mmloom.testkit.toyworld import COLOURS, SHAPES

        over["model.task"] = task
        if zero_weight:  # w_t = 0: no aggregation in the forward process (x reaches the UNet through its input only)
            over.update({"model.task_weight": "constant", "model.task_weight_value": 0.0})
        if task == "image_label":  # a crop's label is its phrase ("red circle"): the 16 objects
            over["model.labels"] = [f"{c} {s}" for c in COLOURS for s in SHAPES]
        else:  # 8 px patches at 32 px (2x2 cells of the factor-4 latents); 4.1's 16 px would be half the picture here
            over["model.patch_size"] = max(4, m["resolution"] // 4)
    return over


def backbone_from(run: str, out: str) -> str:
    """The UNet of a trained run (e.g. M-VADER's whole-UNet run on the toy world), saved
    with diffusers' ``save_pretrained``: a backbone that can draw, for MUMU, which starts
    from a trained text-to-image UNet (SDXL, section 3), as ``model.backbone.path``."""
    from mmloom.train.sample import load_for_sampling

    if not os.path.exists(os.path.join(out, "config.json")):
        _, model, _ = load_for_sampling(run)
        model.unet.save_pretrained(out)
        print(f"[learns] backbone: the UNet of {run} saved to {out}")
    return out


def deeper_unet(path: str) -> str:
    """tiny:unet's layout with a third level and cross-attention on two (1.47M parameters
    against 0.79M): a UNet whose attention reaches further, for the order diagnostic
    (README "Does it learn?")."""
    import torch
    from diffusers import UNet2DConditionModel

    from mmloom.testkit.tiny_train import unet_config

    if not os.path.exists(os.path.join(path, "config.json")):
        cfg = {**unet_config(), "block_out_channels": (32, 64, 64),
               "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
        torch.manual_seed(0)
        UNet2DConditionModel(**cfg).save_pretrained(path)
    return path


def train_for(config: str, shards: str, out: str, minutes: float, chunk: int, over: dict) -> dict:
    """Train in chunks of ``chunk`` steps until ``minutes`` of training time are spent."""
    from importlib.resources import files

    from mmloom.configbase import load_model
    from mmloom.train.config import TrainConfig
    from mmloom.train.loop import read_metrics, train

    path = str(files("mmloom") / "configs" / "train" / f"{config}.yaml")
    spent, steps = 0.0, 0
    while spent < minutes * 60:
        steps += chunk
        cfg = load_model(TrainConfig, path, {"data.shards": shards, "loop.out": out, "loop.steps": steps,
                                             "loop.checkpoint_every": chunk, "loop.log_every": 50,
                                             "loop.keep_checkpoints": 1, **over})
        t = time.time()
        train(cfg, echo=lambda s: None)
        spent += time.time() - t
        hist = read_metrics(out)
        print(f"[learns] {config}: step {hist[-1]['step']}, loss (mean of last 50) "
              f"{sum(h['loss'] for h in hist[-50:]) / len(hist[-50:]):.4f}, {spent / 60:.1f} min of training")
    return {"steps": steps, "train_minutes": round(spent / 60, 2)}


def noise_error_by_t(run: str, n: int = 16, steps=(10, 100, 300, 500, 700, 900, 990)) -> dict:
    """MT-Diffusion: the trained UNet's noise error at fixed timesteps over ``n`` toy pictures
    (the aggregated term grows with t; does the noise stay predictable?)."""
    import torch

    from mmloom.testkit.toyworld import toy_pixels
    from mmloom.train.sample import load_for_sampling

    _fam, model, _cfg = load_for_sampling(run)
    px = toy_pixels(range(1000, 1000 + n), _cfg.data.resolution)
    out = {}
    for t in steps:
        torch.manual_seed(0)
        with torch.no_grad():
            r = model({"pixels": px, "timesteps": torch.full((n,), t)})
        out[t] = {"noise_error": round(float(r["mse"]), 4), "alpha_tilde": round(float(model.agg.alpha_tilde[t]), 2)}
    return out


def save_small(grid: str, path: str) -> None:
    """A 256-colour copy of a picture grid (toy pictures have few colours: a fraction of the size)."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.open(grid).convert("RGB").quantize(256).save(path, optimize=True)
    print(f"[learns] picture grid {path} ({os.path.getsize(path) // 1024} KB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="mumu", choices=sorted(STAGES),
                    help="the family's tiny config(s); kandinsky trains its prior, then its decoder, both in the budget")
    ap.add_argument("--task", default="masked_image", choices=["masked_image", "image_label"],
                    help="mtdiffusion: the second modality (masked-patch restoration, or labels generated with pictures)")
    ap.add_argument("--zero-task-weight", action="store_true",
                    help="mtdiffusion: w_t = 0 instead of appendix E's t / (T - t) (a comparison: no aggregation in the forward process)")
    ap.add_argument("--prior-share", type=float, default=0.25, help="kandinsky: the prior's share of the budget")
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget (all stages together)")
    ap.add_argument("--train-n", type=int, default=512, help="toy pictures to train on")
    ap.add_argument("--heldout-n", type=int, default=64, help="held-out toy pictures (prompts) to evaluate on")
    ap.add_argument("--eval-n", type=int, default=None, help="held-out prompts evaluated (default: all of --heldout-n)")
    ap.add_argument("--chunk", type=int, default=200, help="steps between checkpoints (the budget is checked between chunks)")
    ap.add_argument("--resolution", type=int, default=32, help="training and sampling size (the analyzer reads 32 px reliably)")
    ap.add_argument("--vae-seconds", type=float, default=180.0, help="training time of the toy autoencoder")
    ap.add_argument("--clip-seconds", type=float, default=180.0, help="training time of the toy CLIP")
    ap.add_argument("--eval-steps", type=int, default=None, help="sampling steps (default: the family's)")
    ap.add_argument("--work", default="bench-learns", help="folder for the toy worlds, models and runs")
    ap.add_argument("--picture", default=None, help="also save the family's picture grid here as a 256-colour PNG (docs/learns/FAMILY.png)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                    help="training config override (repeatable), e.g. loop.batch_size=16")
    ap.add_argument("--backbone-from", metavar="RUN",
                    help="start from the UNet of this trained run (model.backbone.path; MUMU starts from a trained text-to-image UNet)")
    ap.add_argument("--deeper-unet", action="store_true",
                    help="a three-level UNet in place of tiny:unet (model.backbone.path; see deeper_unet)")
    ap.add_argument("--tag", default="", help="suffix of the run's folder name (diagnostic runs side by side)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared machine, OpenMP threads waiting on each other cost more than they give)")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from mmloom.train.eval import run_eval

    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    m = models(work, a.resolution, a.vae_seconds, a.clip_seconds)
    train_dir = toy_world(os.path.join(work, f"toy-train-{a.train_n}"), 0, a.train_n, m["clip"])
    held_dir = toy_world(os.path.join(work, f"toy-heldout-{a.heldout_n}"), 1, a.heldout_n, m["clip"])
    print(f"[learns] toy worlds and models ready in {time.time() - t0:.0f} s")
    name = a.family + ("-label" if a.family == "mtdiffusion" and a.task == "image_label" else "") + ("-w0" if a.zero_task_weight else "")
    stages = STAGES[a.family]
    from mmloom.train.sample import parse_settings

    extra = parse_settings(a.set)  # --set, then the backbone options
    if a.deeper_unet:
        extra["model.backbone.path"] = deeper_unet(os.path.join(work, "models", "unet-deeper"))
        extra["model.backbone.subfolder"] = None
    if a.backbone_from:
        src = os.path.abspath(a.backbone_from)
        extra["model.backbone.path"] = backbone_from(src, os.path.join(work, "models", "backbone-" + os.path.basename(src)))
        extra["model.backbone.subfolder"] = None
    t = {"steps": 0, "train_minutes": 0.0, "stages": {}}
    run = ""
    for config in stages:
        share = (a.prior_share if config == "kandinsky-prior-tiny" else 1 - a.prior_share) if len(stages) > 1 else 1.0
        run = os.path.join(work, "runs", f"{name}-{a.train_n}-{a.minutes:g}min{a.tag}" + (f"-{config.split('-')[1]}" if len(stages) > 1 else ""))
        over = {**overrides(a.family, m, config, a.task, a.zero_task_weight), **extra}
        if config == "kandinsky-decoder-tiny":
            over["model.prior_checkpoint"] = os.path.join(work, "runs", f"{name}-{a.train_n}-{a.minutes:g}min{a.tag}-prior")
        st = train_for(config, train_dir, run, a.minutes * share, a.chunk, over)
        t["stages"][config] = st
        t["steps"] += st["steps"]
        t["train_minutes"] = round(t["train_minutes"] + st["train_minutes"], 2)
    if a.family == "mtdiffusion":
        t["noise_error_by_t"] = noise_error_by_t(run)
        print("[learns] noise error by timestep: " + ", ".join(f"t={k}: {v['noise_error']:.3f} (alpha~ {v['alpha_tilde']:g})"
                                                          for k, v in t["noise_error_by_t"].items()))
    # MT-Diffusion samples all T = 1000 steps of Algorithm 1: its own measures, and the unconditional samples they compare with
    conditions = ("unconditional",) if a.family == "mtdiffusion" else ("prompted", "shuffled", "unconditional")
    r = run_eval(run, held_dir, a.eval_n or a.heldout_n, steps=a.eval_steps, progress=False, ablations=a.family in ("mumu", "mvader"),
                 conditions=conditions)
    toy = r["toy"]
    s = toy["scores"]
    measures = r.get("measures") or {}
    # the family's own claim where it has one (issue 17 item 3), else the crop adherence of the prompted samples
    headline = measures.get("headline") or {"what": "adherence (colour and shape where the prompt puts them)",
                                            "value": s["prompted"]["both"], "shuffled": s["shuffled"]["both"], "chance": 1 / 16}
    goal = headline["value"] >= 0.8 and headline["value"] >= 3 * headline["shuffled"]
    summary = {"family": a.family, "task": a.task if a.family == "mtdiffusion" else None, **t, "train_n": a.train_n,
               "heldout_n": a.heldout_n, "overrides": extra, "scores": s, "chance": toy["chance"], "ratio_to_shuffled": toy["ratio_to_shuffled"],
               "measures": measures, "headline": headline, "goal_met": goal, "grid": r["grid"]}
    if a.picture:
        save_small(measures.get("grid") or r["grid"], a.picture)
    with open(os.path.join(run, "learns.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{name}: {t['steps']} steps in {t['train_minutes']} min on {torch.get_num_threads()} threads, "
          f"{a.train_n} toy pictures" + ("".join(f"; {k}: {v['steps']} steps, {v['train_minutes']} min" for k, v in t["stages"].items())
                                         if len(stages) > 1 else ""))
    if "prompted" in s:
        both, shuffled = s["prompted"]["both"], s["shuffled"]["both"]
        print(f"  eval's prompts (caption and crops), colour and shape where the prompt puts them: {both:.3f}   chance {1 / 16:.3f}   "
              f"shuffled prompts {shuffled:.3f}   unconditional {s['unconditional']['both']:.3f}   "
              f"ratio to shuffled {toy['ratio_to_shuffled']:.2f}x")
        print(f"  colour alone {s['prompted']['colour']:.3f} (chance 0.25, shuffled {s['shuffled']['colour']:.3f}); "
              f"shape alone {s['prompted']['shape']:.3f} (chance 0.25, shuffled {s['shuffled']['shape']:.3f})")
    for k in ("crops only", "words only"):
        if k in s:
            print(f"  {k}: colour {s[k]['colour']:.3f}, shape {s[k]['shape']:.3f}, both {s[k]['both']:.3f}")
    ceil = s.get("through the autoencoder", {}).get("both")
    print(f"  ceilings: held-out pictures {s['held-out pictures']['both']:.3f}, through the autoencoder "
          f"{'n/a' if ceil is None else f'{ceil:.3f}'}")
    for line in measures.get("lines", []):
        print("  " + line)
    print(f"  goal on {headline['what']} (>= 0.8 and >= 3x shuffled): {headline['value']:.3f} vs shuffled "
          f"{headline['shuffled']:.3f}, chance {headline['chance']:.3f}: {'MET' if goal else 'not met'}; grid {r['grid']}")


if __name__ == "__main__":
    main()
