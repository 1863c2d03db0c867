"""Latent-diffusion parts every UNet family shares: loading a UNet and an autoencoder
(KL or VQ) by hub id or local dir, the DDPM schedule, seeded start noise and the
conversion of decoded pixels to pictures. MUMU, MT-Diffusion and Kandinsky use them."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from mmloom.configbase import Section
from mmloom.models import hf_pretrained


class ScheduleConfig(Section):
    num_train_timesteps: int = Field(1000, gt=1, description="DDPM steps T")
    beta_schedule: str = Field("scaled_linear", description="DDPM beta schedule (diffusers name: scaled_linear, linear, squaredcos_cap_v2)")
    beta_start: float = Field(0.00085, gt=0, description="first DDPM beta")
    beta_end: float = Field(0.012, gt=0, description="last DDPM beta")


def ddpm(cfg: ScheduleConfig, prediction_type: str = "epsilon"):
    """The DDPM training scheduler. Its config is also what the samplers (DDIM, PNDM) are
    built from, so it carries the released SD / Versatile Diffusion / Kandinsky sampler
    settings: no clipping of the predicted x0 (latents are not in [-1, 1]), timesteps
    offset by 1 and the final step to alpha_T, not 1 (``set_alpha_to_one`` false)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                          beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=prediction_type,
                          clip_sample=False, steps_offset=1)
    sched.register_to_config(set_alpha_to_one=False)  # read by DDIM / PNDM built from this config
    return sched


def load_unet(ref: str, subfolder: Optional[str]):
    from diffusers import UNet2DConditionModel

    from ..testkit.tiny_train import resolve_tiny

    return hf_pretrained(UNet2DConditionModel, resolve_tiny(ref), "UNet", strict=True, **({"subfolder": subfolder} if subfolder else {}))


class Autoencoder(nn.Module):
    """A frozen image autoencoder: diffusers AutoencoderKL (``kl``, latents scaled by the
    config's scaling factor) or VQModel (``vq``, MoVQ as in Kandinsky; decoding
    quantizes, which the Kandinsky paper found better than skipping it)."""

    def __init__(self, ref: str, subfolder: Optional[str], kind: Literal["kl", "vq"] = "kl"):
        super().__init__()
        from diffusers import AutoencoderKL, VQModel

        from ..testkit.tiny_train import resolve_tiny

        cls = AutoencoderKL if kind == "kl" else VQModel
        self.kind = kind
        self.model = hf_pretrained(cls, resolve_tiny(ref), "VQ autoencoder" if kind == "vq" else "VAE",
                                   **({"subfolder": subfolder} if subfolder else {}))
        self.model.requires_grad_(False)
        self.scale = float(self.model.config.scaling_factor) if kind == "kl" else 1.0
        self.downscale = 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        c = self.model.config
        return c.latent_channels if self.kind == "kl" else (c.vq_embed_dim or c.latent_channels)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of pixels in [-1, 1]: a KL autoencoder's posterior sampled (as SD trains),
        with ``generator`` when given, so that sampling from a seed is repeatable."""
        pixels = pixels.to(self.model.device, self.model.dtype)
        if self.kind == "kl":
            return self.model.encode(pixels).latent_dist.sample(generator=generator) * self.scale
        return self.model.encode(pixels).latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.model.dtype) / self.scale
        out = self.model.decode(latents).sample if self.kind == "kl" else self.model.decode(latents, force_not_quantize=False).sample
        return out.clamp(-1, 1)


def draw_timesteps(T: int, like: torch.Tensor) -> torch.Tensor:
    """One training timestep per sample of ``like`` (its first axis), uniform over 0..T-1
    (DDPM's simplified objective draws t uniformly; every family trains so), on ``like``'s
    device. One place for the draw, so that its range and batch axis are tested once."""
    return torch.randint(0, T, (like.shape[0],), device=like.device)


def start_noise(shape: tuple[int, ...], seeds: list[int], device) -> torch.Tensor:
    """One seeded Gaussian per sample (the same seed gives the same picture on any device)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


def guided_sample(sched, steps: int, shape: tuple[int, ...], seeds: list[int], device, guidance: float,
                  eps_cond, eps_uncond) -> torch.Tensor:
    """Classifier-free-guided sampling with a diffusers scheduler (DDIM, PNDM): seeded start
    noise, then ``eps_u + guidance * (eps_c - eps_u)`` at each of ``steps`` steps.
    ``eps_cond(x, t)`` and ``eps_uncond(x, t)`` are the model's two noise predictions."""
    sched.set_timesteps(steps)
    x = start_noise(shape, seeds, device) * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        c, u = eps_cond(inp, t), eps_uncond(inp, t)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return x


def to_pil(images: torch.Tensor):
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
