"""Benchmark: MUMU training images/s and MFU.

Reference size (issue: an SD2-base-sized UNet at 256 px, 32x32 latents, a small VLM
encoder, bf16), built with random weights in the real architectures: UNet2DConditionModel
with SD2-base's config (cross-attention 1024), SD's AutoencoderKL config, and a small
Idefics2 (SigLIP-style vision tower, Mistral-style LM). FLOPs are counted once with
torch's FlopCounterMode; MFU = FLOPs/sample x samples/s / peak (H100 bf16 dense: 989 TFLOP/s).
MosaicML's published SD2 training reached about 24% MFU at 256 px on A100s.

    python bench/train.py --tiny                     # tiny config on CPU
    python bench/train.py --device cuda --batch-size 64 --steps 20   # reference size on a GPU
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from PIL import Image


def make_reference_models(root: str) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    from mmloom.testkit.tiny_train import make_tiny_vlm

    UNet2DConditionModel(  # stabilityai/stable-diffusion-2-base unet/config.json
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
    ).save_pretrained(os.path.join(root, "unet"))
    AutoencoderKL(  # SD's VAE config
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
    ).save_pretrained(os.path.join(root, "vae"))
    vlm = make_tiny_vlm(os.path.join(root, "vlm"), "a red circle on grey background".split(), image_size=224, patch_size=14)
    cfg = Idefics2Config.from_pretrained(vlm)
    cfg.vision_config.update(dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6))
    cfg.text_config.update(dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4))
    cfg.perceiver_config.update(dict(hidden_size=768))
    Idefics2ForConditionalGeneration(cfg).save_pretrained(vlm)
    return {"encoder": {"path": vlm, "image_size": 224}, "backbone": {"path": os.path.join(root, "unet"), "subfolder": None},
            "autoencoder": {"path": os.path.join(root, "vae"), "subfolder": None}, "adapter_layers": 4, "adapter_heads": 16}


def main() -> None:
    from mmloom.train.config import TrainConfig
    from mmloom.train.families import get_family
    from mmloom.train.flops import flops_per_sample, peak_flops
    from mmloom.train.prompts import Prompt
    from mmloom.testkit.tiny_train import make_tiny_mumu

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny config instead of the reference size")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPU, fp32 on CPU")
    a = ap.parse_args()
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
            with autocast:
                loss = model(batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

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
