"""Benchmark: training input (default) and MUMU training speed (--mfu).

Training input: for each family's tiny config (configs/train/*-tiny*.yaml: mumu, mvader,
versatile, mtdiffusion, kandinsky prior and decoder), steps of the real training step
(the family's model, AdamW) fed by the project's loader (train/data.py make_loader, the
webdataset pipeline the trainer uses) on real final/ shards: the fraction of step time
spent waiting for the next batch, three ways: as the configs have it (data.num_workers 0,
exact resume, with the prefetch thread of data.prefetch, default 2 batches ahead), the
same in turn (data.prefetch 0, the trainer before the thread), and 1 worker process.
Then the loader alone: samples/s (one process) and samples per CPU-second of the process
(per core).
The shards: --shards DIR (a dataset directory, e.g. `mmloom demo`'s mmloom-demo), else
the demo's curation (ingest to build, no training) is run first into a temp folder
(about 2 minutes).

    python bench/train.py                            # training input, every family, on the demo's final/ shards
    python bench/train.py --shards mmloom-demo --families mumu,mvader --steps 20
    python bench/train.py --tiny                     # tiny MUMU on CPU: images/s (--mfu implied)
    python bench/train.py --mfu --device cuda --batch-size 64 --steps 20   # reference size on a GPU

MUMU speed (--mfu), reference size (issue: an SD2-base-sized UNet at 256 px, 32x32
latents, a small VLM encoder, bf16), built with random weights in the real
architectures: UNet2DConditionModel with SD2-base's config (cross-attention 1024), SD's
AutoencoderKL config, and a small Idefics2 (SigLIP-style vision tower, Mistral-style LM).
FLOPs are counted once with torch's FlopCounterMode; MFU = FLOPs/sample x samples/s / peak
(H100 bf16 dense: 989 TFLOP/s). MosaicML's published SD2 training reached about 24% MFU
at 256 px on A100s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from PIL import Image


def make_small_idefics2(path: str) -> str:
    """A small random Idefics2 (SigLIP-style 6x384 vision tower at 224 px, patch 14;
    Mistral-style 8x768 LM) in the transformers format."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    from mmloom.testkit.tiny_train import make_tiny_vlm

    vlm = make_tiny_vlm(path, "a photo of red circle on grey background".split(), image_size=224, patch_size=14)
    cfg = Idefics2Config.from_pretrained(vlm)
    cfg.vision_config.update(dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6))
    cfg.text_config.update(dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4))
    cfg.perceiver_config.update(dict(hidden_size=768))
    Idefics2ForConditionalGeneration(cfg).save_pretrained(vlm)
    return vlm


def make_sd_vae(path: str) -> str:
    """SD's AutoencoderKL config, random weights."""
    from diffusers import AutoencoderKL

    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
    ).save_pretrained(path)
    return path


def make_reference_models(root: str) -> dict:
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(  # stabilityai/stable-diffusion-2-base unet/config.json
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
    ).save_pretrained(os.path.join(root, "unet"))
    return {"encoder": {"path": make_small_idefics2(os.path.join(root, "vlm")), "image_size": 224},
            "backbone": {"path": os.path.join(root, "unet"), "subfolder": None},
            "autoencoder": {"path": make_sd_vae(os.path.join(root, "vae")), "subfolder": None}, "adapter_layers": 4, "adapter_heads": 16}


# ------------------------------------------------------------------------------------ training input
TINY_CONFIGS = {"mumu": ["mumu-tiny"], "mvader": ["mvader-tiny"], "versatile": ["versatile-tiny"],
                "mtdiffusion": ["mtdiffusion-tiny"], "kandinsky": ["kandinsky-prior-tiny", "kandinsky-decoder-tiny"]}


def demo_shards(out: str) -> str:
    """The demo's curation (ingest ... build, every stage real) into ``out``, without its training."""
    import mmloom.curate.demo as demo

    train = demo.train_demo
    demo.train_demo = lambda *a, **k: {}  # curation only: this benchmark trains itself
    try:
        demo.run_demo(out, progress=False, echo=lambda *a: None)
    finally:
        demo.train_demo = train
    return out


def load_tiny(name: str, shards: str, out: str, workers: int | None):
    from importlib.resources import files

    from mmloom.configbase import load_model
    from mmloom.errors import UserError
    from mmloom.train.config import TrainConfig

    over = {"data.shards": shards, "loop.out": out}
    if workers is not None:
        over["data.num_workers"] = workers
    if name.startswith("kandinsky"):
        try:  # the CLIP whose embeddings the score stage stored (the demo's tiny CLIP)
            from mmloom.curate.dataset import dataset_config

            over["model.encoder.path"] = dataset_config(shards, None).score.clip.model
        except (UserError, OSError):  # shards without a dataset config: the tiny CLIP of the same width
            pass
    return load_model(TrainConfig, str(files("mmloom") / "configs" / "train" / f"{name}.yaml"), over)


def wait_fraction(model, opt, cfg, mode: str, steps: int, warmup: int = 3) -> dict:
    """Training steps fed by the real loader (``mode``: ``thread`` as configured, with the
    prefetch thread; ``process`` in turn, no thread; ``worker``: 1 worker process): time
    blocked in next() vs the whole step."""
    from mmloom.train.data import make_loader
    from mmloom.train.prompts import PromptBuilder

    data = cfg.data.model_copy(update={"num_workers": 1 if mode == "worker" else 0,
                                       **({"prefetch": 0} if mode == "process" else {})})
    loader, _ds = make_loader(data, PromptBuilder(cfg.prompt), cfg.loop.batch_size, cfg.loop.seed)
    it = iter(loader)
    model.train()
    wait = total = 0.0
    n = 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i >= warmup:
            wait, total, n = wait + t1 - t0, total + t2 - t0, n + len(batch["prompts"])
    return {"wait": wait / total, "step_ms": total / steps * 1e3, "samples_per_s": n / total}


def build(cfg):
    from mmloom.train.families import get_family

    torch.manual_seed(cfg.loop.seed)
    fam = get_family(cfg.family)
    model = fam.build(cfg.model, cfg)
    groups = fam.param_groups(model, cfg.model)
    for g in groups:
        g.pop("name", None)
    return model, torch.optim.AdamW(groups, weight_decay=cfg.loop.weight_decay)


def loader_alone(cfg, samples: int) -> dict:
    """The loader by itself in this process (num_workers 0): samples/s and samples per
    CPU-second of the process (its per-core rate)."""
    from mmloom.train.data import make_loader
    from mmloom.train.prompts import PromptBuilder

    data = cfg.data.model_copy(update={"num_workers": 0, "prefetch": 0})
    loader, _ds = make_loader(data, PromptBuilder(cfg.prompt), cfg.loop.batch_size, cfg.loop.seed)
    it = iter(loader)
    next(it)
    n, t, c = 0, time.perf_counter(), time.process_time()
    while n < samples:
        n += len(next(it)["prompts"])
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"per_s": n / wall, "per_cpu_s": n / cpu}


def data_main(a) -> None:
    names = [n for f in a.families.split(",") for n in TINY_CONFIGS[f]]
    with tempfile.TemporaryDirectory() as tmp:
        shards = a.shards
        if not shards:
            t = time.perf_counter()
            shards = demo_shards(os.path.join(tmp, "demo"))
            print(f"demo curation (ingest to build) for the shards: {time.perf_counter() - t:.0f} s")
        from mmloom.train.data import shard_urls

        print(f"training input on {os.cpu_count()} cores, torch {torch.get_num_threads()} threads, "
              f"{len(shard_urls(shards))} final/ shards in {shards}; {a.steps} timed steps after 3")
        rows = []
        for name in names:
            cfg = load_tiny(name, shards, os.path.join(tmp, "runs", name), None)
            model, opt = build(cfg)
            r = {m: wait_fraction(model, opt, cfg, m, a.steps) for m in ("process", "thread", "worker")}
            alone = loader_alone(cfg, a.loader_samples)
            rows.append(r)
            print(f"  {name:<22} batch {cfg.loop.batch_size}, {cfg.data.resolution} px: waiting for data "
                  f"{r['thread']['wait']:6.1%} of step time as configured (num_workers {cfg.data.num_workers}, prefetch thread "
                  f"{cfg.data.prefetch} ahead, {r['thread']['step_ms']:.0f} ms/step), {r['process']['wait']:6.1%} in turn (prefetch 0, "
                  f"{r['process']['step_ms']:.0f} ms/step), {r['worker']['wait']:6.1%} with 1 worker process "
                  f"({r['worker']['step_ms']:.0f} ms/step); loader alone {alone['per_s']:.1f} samples/s, "
                  f"{alone['per_cpu_s']:.1f} samples per CPU-second", flush=True)
            del model, opt
        worst = {m: max(r[m]["wait"] for r in rows) for m in ("process", "thread", "worker")}
        print(f"worst wait fraction: {worst['thread']:.1%} as configured (prefetch thread), {worst['process']:.1%} in turn, "
              f"{worst['worker']:.1%} with 1 worker (goal: at most 5%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mfu", action="store_true", help="MUMU training images/s and MFU instead of the training input")
    ap.add_argument("--shards", default=None, help="a dataset directory (or glob) of final/ shards; default: run the demo's curation")
    ap.add_argument("--families", default=",".join(TINY_CONFIGS))
    ap.add_argument("--loader-samples", type=int, default=200, help="samples drawn from the loader alone")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="MUMU speed (--mfu) with the tiny config instead of the reference size")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="--mfu: default bf16 on GPU, fp32 on CPU")
    a = ap.parse_args()
    if a.mfu or a.tiny:
        mfu_main(a)
    else:
        data_main(a)


def train_step(model, batch: dict, opt, autocast) -> None:
    """One optimizer step on ``batch`` (here and in bench/gpu.py)."""
    with autocast:
        loss = model(batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def mfu_main(a) -> None:
    from mmloom.train.config import TrainConfig
    from mmloom.train.families import get_family
    from mmloom.train.flops import flops_per_sample, peak_flops
    from mmloom.train.prompts import Prompt
    from mmloom.testkit.tiny_train import make_tiny_mumu

    dev = torch.device(a.device)
    prec = a.precision or ("bf16" if dev.type == "cuda" else "fp32")
    with tempfile.TemporaryDirectory() as d:
        model_cfg = make_tiny_mumu(d, "a red circle".split()) if a.tiny else make_reference_models(d)
        res, crop = (64, 64) if a.tiny else (256, 224)
        cfg = TrainConfig.model_validate({"model": model_cfg, "prompt": {"crop_size": crop}, "data": {"resolution": res}})
        fam = get_family("mumu")
        torch.manual_seed(0)
        model = fam.build(cfg.model, cfg).to(dev)
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        opt = torch.optim.AdamW([p for g in fam.param_groups(model, cfg.model) for p in g["params"]], lr=1e-5, fused=dev.type == "cuda")
        crop_img = Image.new("RGB", (crop, crop), "red")
        batch = {"pixels": torch.rand(a.batch_size, 3, res, res, device=dev) * 2 - 1,
                 "prompts": [Prompt(parts=["a ", crop_img, " red circle on a grey background"]) for _ in range(a.batch_size)]}
        flops = flops_per_sample(model, batch)
        peak = peak_flops(dev, None)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16")

        def step():
            train_step(model, batch, opt, autocast)

        step()  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ips = a.steps * a.batch_size / (time.perf_counter() - t)
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{'tiny' if a.tiny else 'reference (SD2-base UNet, 256 px, small Idefics2)'} on {name}, {prec}, batch {a.batch_size}")
    print(f"  parameters {n_params / 1e6:.1f} M ({n_train / 1e6:.2f} M trained)")
    print(f"  {flops / 1e9:.1f} GFLOP per training sample (forward + backward)")
    print(f"  {ips:.2f} images/s")
    if peak:
        print(f"  MFU {flops * ips / peak:.1%} of {peak / 1e12:.0f} TFLOP/s (MosaicML SD2 at 256 px on A100: ~24%)")
    else:
        print("  MFU: no peak figure for this device")


if __name__ == "__main__":
    main()
