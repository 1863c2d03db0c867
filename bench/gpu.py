"""GPU benchmark (issue 16, item 4), one run: bf16 with SDPA attention.

(a) score: the score stage with CLIP ViT-L/14 (open_clip's real architecture, random
    weights) and the heads that read its embedding (aesthetic, CLIP-MLP NSFW), phash,
    geometry and caption cleaning, on a committed shard of 256 px JPEGs: stage images/s,
    the same batches through the models alone, and the fraction (bench/score.py's
    measurement); also ViT-L/14's image tower alone on ready tensors, and the stage's CPU
    side alone (decode and preparation, no model: what could feed the GPU).
(b) training: samples/s and model FLOPs utilization of an SD 1.5-size and an SDXL-size
    UNet (random init, real configs, 512 and 1024 px) in
    * the MUMU training step through the family's own code (train/families/mumu.py:
      VLM encoder, adapter, LoRA on the UNet, frozen VAE; a small random Idefics2
      stands in for idefics2-8b, prompts of text and one 224 px crop), and
    * the Versatile Diffusion step as a plain UNet forward and backward over VD's two
      image flows (text context 77 tokens, image context 257 tokens of the UNet's
      cross-attention width, as the frozen CLIP encoders give them; their forward passes
      are not run), losses summed, the whole UNet trained, frozen VAE encode included.
    FLOPs per sample: torch.utils.flop_counter.FlopCounterMode over one forward and
    backward; MFU = FLOPs/sample x samples/s / the GPU's bf16 dense peak (table by
    device name, --peak-tflops overrides).
(c) peak GPU memory of each (torch.cuda.max_memory_allocated).

    bash bench/gpu.sh                     # a GPU: the real sizes; eager about 3 minutes on an H200 (2026-11-29: 111 s for the four training steps)
    bash bench/gpu.sh --compile           # torch.compile the UNets and CLIP's image tower too
    bash bench/gpu.sh --parts score --score-threads 2,4,16 --cpu-threads 1,4,8,16 --cpu-procs 8,14
                                          # the score stage with other thread counts, and its CPU side alone
    python bench/gpu.py --tiny            # no GPU: tiny models on CPU, the same code paths (< 1 min)

A batch that does not fit is halved until it does (the batch used is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# diffusers UNet2DConditionModel configs (runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# MUMU's adapter per UNet (configs/train/mumu-sd15.yaml, mumu-idefics2-sdxl.yaml)
ADAPTER = {"sd15": (8, 12), "sdxl": (16, 16)}


def unet_configs(tiny: bool) -> dict:
    if not tiny:
        return {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
    from mmloom.testkit.tiny_train import unet_config

    return {"sd15": unet_config(32, False, 8), "sdxl": unet_config(32, True, 8)}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class Meter:
    """Peak memory of one part: GPU memory allocated, or on CPU the process's max RSS."""

    def __init__(self, dev: torch.device):
        self.dev = dev

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def peak(self) -> str:
        if self.dev.type == "cuda":
            return f"peak GPU memory {gib(torch.cuda.max_memory_allocated())}"
        return f"peak memory n/a on CPU (process max RSS {gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)})"


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- (a) score
def score_part(a, dev: torch.device) -> None:
    from score import score_models, stage_vs_forward

    from mmloom.filters.heads import save_head

    arch = "tiny" if a.tiny else "ViT-L-14"
    n, bs = (16, 8) if a.tiny else (a.score_images, a.score_batch)
    with tempfile.TemporaryDirectory() as d:
        cfg = score_models(d, arch)
        dim = 32 if a.tiny else 768
        save_head(os.path.join(d, "nsfw-head-l14.pt"), [dim, 64, 1])
        cfg = {**cfg, "device": str(dev), "batch_size": bs, "precision": "fp32" if dev.type == "cpu" else "bf16",
               "nsfw": {"backend": "clip_mlp", "model": os.path.join(d, "nsfw-head-l14.pt")},
               "watermark": {"backend": "none"}, "faces": {"backend": "none"}, "resize_on_device": not a.resize_on_cpu}
        if a.compile:
            _compile_clip_towers()
        with Meter(dev) as m:
            ints = lambda v: tuple(int(k) for k in v.split(",") if k)  # noqa: E731
            cpu = (ints(a.cpu_threads), ints(a.cpu_procs)) if a.cpu_threads or a.cpu_procs else None
            r = stage_vs_forward(cfg, n, 1 if a.tiny else 2, sweep=ints(a.score_threads), cpu=cpu)
            tensors = clip_tensors_rate(cfg["clip"]["model"], dev, bs, 2 if a.tiny else 20, a.compile)
    where = "with Pillow on the CPU" if a.resize_on_cpu or dev.type == "cpu" else "on the GPU (Pillow's arithmetic)"
    where += ", decoded by Pillow" if a.decode == "pil" else ", JPEGs decoded by OpenCV (Pillow's pixels)"
    print(f"[score] CLIP {arch} score set (+ aesthetic and CLIP-MLP NSFW heads, phash, geometry, captions; no nudenet, "
          f"watermark or faces), resized {where}, {n} images of 256 px, batch {bs}, {r['threads']} prefetch thread(s): "
          f"stage {r['stage']:.1f} images/s, forward-only {r['forward']:.1f} images/s, fraction {r['frac']:.1%} "
          f"(serial stage {r['serial']:.1f} images/s, {r['frac_serial']:.1%}); decode + prepare alone {r['prep_ms']:.2f} ms/image "
          f"on one thread, {r['cpu_side']:.1f} images/s with {r['threads']} thread(s); image tower alone on ready tensors {tensors:.1f} images/s; {m.peak()}")
    if r["same_pixels"] is not None:
        print(f"[score]   pixels resized on the GPU equal Pillow's (CLIP input, phash's grey 32x32; 64 images) and decoded pixels Pillow's (512 JPEGs): {r['same_pixels']}")
    for k, v in r["sweep"].items():
        print(f"[score]   stage with {k} prefetch thread(s): {v:.1f} images/s, {v / r['forward']:.1%} of forward-only")


def _compile_clip_towers() -> None:
    """--compile: every ClipEmbedder built from here on compiles its image tower."""
    from mmloom import clip as clip_embed

    real = clip_embed.ClipEmbedder.__init__

    def init(self, *args, **kw):
        real(self, *args, **kw)
        self.model.visual.compile()

    clip_embed.ClipEmbedder.__init__ = init


@torch.no_grad()
def clip_tensors_rate(ref: str, dev: torch.device, bs: int, iters: int, compile_: bool) -> float:
    from mmloom.clip import ClipEmbedder

    e = ClipEmbedder(ref, str(dev), "fp32" if dev.type == "cpu" else "bf16")
    size = e.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(bs, 3, size, size, device=dev)
    auto = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    with auto:
        for _ in range(2):
            e.model.encode_image(x)
        sync(dev)
        t = time.perf_counter()
        for _ in range(iters):
            e.model.encode_image(x)
        sync(dev)
    return iters * bs / (time.perf_counter() - t)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------- (b) training
def support_models(root: str, tiny: bool) -> dict:
    """The VLM and VAE every training step shares (random weights, saved once)."""
    if tiny:
        return {"vlm": "tiny:vlm", "vae": "tiny:vae", "vlm_image_size": 64}
    from train import make_sd_vae, make_small_idefics2

    return {"vlm": make_small_idefics2(os.path.join(root, "vlm")), "vae": make_sd_vae(os.path.join(root, "vae")), "vlm_image_size": 224}


@contextlib.contextmanager
def unet_built_as(cfg: dict, dev: torch.device):
    """The family's UNet loader replaced by a random init of ``cfg`` made on the device
    (no weights exist here, and an SDXL UNet is too big to save and load for nothing)."""
    from diffusers import UNet2DConditionModel

    import mmloom.train.diffusion as D

    real = D.load_unet

    def build(ref, subfolder):
        with torch.device(dev):
            return UNet2DConditionModel(**cfg)

    D.load_unet = build
    try:
        yield
    finally:
        D.load_unet = real


def mumu_step(size: str, unet_cfg: dict, support: dict, dev: torch.device, bs: int, tiny: bool):
    from PIL import Image

    from mmloom.train.config import TrainConfig
    from mmloom.train.families import get_family
    from mmloom.train.prompts import Prompt

    res = unet_cfg["sample_size"] * 8
    crop = support["vlm_image_size"]
    layers, heads = (2, 2) if tiny else ADAPTER[size]
    cfg = TrainConfig.model_validate({
        "family": "mumu", "prompt": {"crop_size": crop}, "data": {"resolution": res},
        "model": {"encoder": {"path": support["vlm"], "image_size": crop}, "backbone": {"path": "random-init", "subfolder": None},
                  "autoencoder": {"path": support["vae"], "subfolder": None}, "adapter_layers": layers, "adapter_heads": heads, "cond_dropout": 0.0},
    })
    fam = get_family("mumu")
    torch.manual_seed(0)
    with unet_built_as(unet_cfg, dev):
        model = fam.build(cfg.model, cfg).to(dev)
    params = [p for g in fam.param_groups(model, cfg.model) for p in g["params"]]
    crop_img = Image.new("RGB", (crop, crop), "red")

    def batch(n):
        return {"pixels": torch.rand(n, 3, res, res, device=dev) * 2 - 1,
                "prompts": [Prompt(parts=["a photo of ", crop_img, " a red circle on a grey background"]) for _ in range(n)]}

    what = (f"family code path (train/families/mumu.py: {'tiny Idefics2' if tiny else 'small random Idefics2 (6x384 vision, 8x768 LM)'} "
            f"encoder with LoRA, {layers}-layer adapter, LoRA rank 8 on the UNet, frozen VAE, one {crop} px crop per prompt)")
    return model, model.unet, params, batch, what


class PlainVD(torch.nn.Module):
    """Versatile Diffusion's two image flows on one UNet: text context [B, 77, C] and image
    context [B, 257, C] (the frozen CLIP encoders' output shapes), losses summed."""

    def __init__(self, unet, ae):
        super().__init__()
        from mmloom.train.diffusion import ScheduleConfig, ddpm

        self.unet, self.ae = unet, ae
        self.sched = ddpm(ScheduleConfig(beta_schedule="scaled_linear"))  # VD section 4.2, as train/families/versatile.py
        c = unet.config
        self.pooled = (c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim) if c.addition_embed_type == "text_time" else None

    def forward(self, batch: dict) -> dict:
        lat = self.ae.encode(batch["pixels"])
        n, dev, width = lat.shape[0], lat.device, self.unet.config.cross_attention_dim
        added = None
        if self.pooled:
            h, w = batch["pixels"].shape[-2:]
            added = {"text_embeds": torch.randn(n, self.pooled, device=dev),
                     "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=dev).repeat(n, 1)}
        total = 0.0
        for tokens in (77, 257):  # text_to_image, image_variation
            ctx = torch.randn(n, tokens, width, device=dev)
            noise = torch.randn_like(lat)
            t = torch.randint(0, self.sched.config.num_train_timesteps, (n,), device=dev)
            pred = self.unet(self.sched.add_noise(lat, noise, t), t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
            total = total + torch.nn.functional.mse_loss(pred.float(), noise.float())
        return {"loss": total}


def vd_step(size: str, unet_cfg: dict, support: dict, dev: torch.device, bs: int, tiny: bool):
    from diffusers import UNet2DConditionModel

    from mmloom.train.diffusion import Autoencoder
    from mmloom.testkit.tiny_train import resolve_tiny

    torch.manual_seed(0)
    with torch.device(dev):
        unet = UNet2DConditionModel(**unet_cfg)
    ae = Autoencoder(resolve_tiny(support["vae"]), None, "kl").to(dev)
    model = PlainVD(unet, ae)
    res = unet_cfg["sample_size"] * 8

    def batch(n):
        return {"pixels": torch.rand(n, 3, res, res, device=dev) * 2 - 1, "prompts": [None] * n}

    what = ("plain UNet forward and backward with VD's conditioning shapes (two image flows: 77- and 257-token "
            "contexts, losses summed; whole UNet trained; frozen VAE encode; CLIP encoders not run)")
    return model, unet, list(unet.parameters()), batch, what


def count_flops(model, batch: dict, autocast) -> float:
    """FLOPs of one forward and backward per sample (train/flops.py: FlopCounterMode with
    grouped-query-attention-aware SDPA formulas), gradients cleared."""
    from mmloom.train.flops import flops_per_sample

    flops = flops_per_sample(model, batch, autocast)
    if flops is None:
        raise RuntimeError("FLOPs could not be counted (the warning above says why)")
    return flops


def train_part(a, dev: torch.device, family: str, size: str, unet_cfg: dict, support: dict, peak: float | None) -> None:
    bs = (2 if a.tiny else {"sd15": a.batch_sd15, "sdxl": a.batch_sdxl}[size])
    build = mumu_step if family == "mumu" else vd_step
    while True:
        oom = False
        try:
            with Meter(dev) as m:
                r = _train_once(a, dev, build, size, unet_cfg, support, bs)
        except torch.cuda.OutOfMemoryError:
            oom = True  # handled below, once the traceback (and the model it holds) is gone
        free()  # the model, its gradients and optimizer state went with _train_once's frame
        if not oom:
            break
        if bs == 1:
            print(f"[train] {family} {size}: out of memory at batch 1")
            return
        bs //= 2
        print(f"[train] {family} {size}: out of memory, batch halved to {bs}")
    ips, flops, what, procs, n_params, n_train, compiled = r
    mfu = f"MFU {flops * ips / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "MFU n/a (no bf16 peak known for this device; --peak-tflops sets one)"
    res = unet_cfg["sample_size"] * 8
    label = f"{'tiny ' if a.tiny else ''}{ {'sd15': 'SD 1.5', 'sdxl': 'SDXL'}[size]}-{'style' if a.tiny else 'size'} UNet ({res} px)"
    print(f"[train] {family} {size}: {label}, batch {bs}, {ips:.2f} samples/s, {flops / 1e9:.{1 if flops >= 1e10 else 4}f} GFLOP/sample "
          f"(FlopCounterMode, forward+backward), {mfu}; {m.peak()}; "
          f"params {n_params / 1e6:.0f} M ({n_train / 1e6:.1f} M trained); attention {procs}; "
          f"{'torch.compile' if compiled else 'eager'}; {what}")


def _train_once(a, dev, build, size, unet_cfg, support, bs):
    from train import train_step
    model, unet, params, batch, what = build(size, unet_cfg, support, dev, bs, a.tiny)
    model.train()
    procs = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    sdpa = all(p.endswith("2_0") or "SDPA" in p or "Sdpa" in p for p in procs)
    procs = "/".join(procs) + (" (SDPA)" if sdpa else "")
    bf16 = dev.type == "cuda"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    flops = count_flops(model, batch(1), autocast)
    compiled = False
    if a.compile:
        unet.compile()
        compiled = True
    opt = torch.optim.AdamW(params, lr=1e-5, fused=dev.type == "cuda")
    b = batch(bs)

    def step():
        train_step(model, b, opt, autocast)

    for _ in range(a.warmup):
        step()
    sync(dev)
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync(dev)
    ips = a.steps * bs / (time.perf_counter() - t)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    return ips, flops, what, procs, n_params, n_train, compiled


def main(argv=None) -> None:
    from mmloom.train.flops import peak_flops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models (CPU when there is no GPU): checks the code paths, not the speed")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--parts", default="score,mumu,vd")
    ap.add_argument("--sizes", default="sd15,sdxl")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the device (default: table by device name)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNets (after counting FLOPs) and CLIP's image tower")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 10, tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, 3 with --compile, tiny 1)")
    ap.add_argument("--batch-sd15", type=int, default=16)
    ap.add_argument("--batch-sdxl", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=None, help="training pixels (default: the UNet's own, 512 / 1024; tiny 64)")
    ap.add_argument("--score-images", type=int, default=2048)
    ap.add_argument("--score-batch", type=int, default=256)
    ap.add_argument("--cpu-threads", default="", help="the score stage's CPU side alone with these thread counts, e.g. 1,4,8,16")
    ap.add_argument("--cpu-procs", default="", help="... and with these worker process counts, e.g. 8,16")
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval for the run (Python's default 0.005 s): how long the thread that drives the GPU may wait for the lock")
    ap.add_argument("--decode", choices=["default", "pil"], default="default", help="score: pil decodes every JPEG with Pillow (the stage before OpenCV's lock-free decoding)")
    ap.add_argument("--resize-on-cpu", action="store_true", help="score: resize with Pillow on the CPU (score.resize_on_device: false) instead of on the GPU")
    ap.add_argument("--score-threads", default="", help="other prefetch thread counts to time the score stage with once each, e.g. 2,4,16")
    a = ap.parse_args(argv)
    if a.decode == "pil":
        from mmloom import imageguard

        imageguard.decode_rgb = imageguard.open_image
    if a.switch_interval:
        import sys

        sys.setswitchinterval(a.switch_interval)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a.steps = a.steps or (2 if a.tiny else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else (3 if a.compile else 2))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(dev, a.peak_tflops)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"[gpu] {datetime.date.today().isoformat()} {name}; torch {torch.__version__}; "
          f"{'bf16 autocast' if dev.type == 'cuda' else 'fp32 (CPU)'}; SDPA attention; "
          f"{'torch.compile' if a.compile else 'eager'}; {'tiny models' if a.tiny else 'real sizes, random weights'}; "
          f"peak {'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown'}{' (--peak-tflops)' if a.peak_tflops else ''}"
          f"{f'; switch interval {a.switch_interval} s' if a.switch_interval else ''}")
    t0 = time.perf_counter()
    parts = a.parts.split(",")
    if "score" in parts:
        score_part(a, dev)
        free()
    with tempfile.TemporaryDirectory() as root:
        support = support_models(root, a.tiny) if {"mumu", "vd"} & set(parts) else None
        configs = unet_configs(a.tiny)
        if a.resolution:  # e.g. to check the real configs on a CPU at a small size
            configs = {k: {**v, "sample_size": a.resolution // 8} for k, v in configs.items()}
        for family in ("mumu", "vd"):
            if family in parts:
                for size in a.sizes.split(","):
                    train_part(a, dev, family, size, configs[size], support, peak)
    print(f"[gpu] done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
