"""MUMU (MUMU: Bootstrapping Multimodal Image Generation from Text-to-Image Data): a
vision-language model encodes the interleaved prompt, a small non-causal "adapter"
transformer maps its hidden states into the UNet's cross-attention (section 3), and a
diffusers UNet2DConditionModel denoises AutoencoderKL latents with epsilon prediction, MSE
and a DDPM schedule (section 2.1). Table 1: vision tower frozen; rank-8 LoRA on the
connector (3e-6), the language model (3e-6) and the UNet (5e-6); the adapter fully
trained (1e-5).

Sampling (section 2.1): 50-step DDIM with classifier-free guidance "for all predictions".
The paper states no guidance scale; mmloom uses 6 (its default before sampling defaults
moved into the family, kept so that existing runs sample as they did; SDXL, MUMU's
backbone, is commonly sampled at 5 to 7.5).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmloom.errors import UserError
from ..diffusion import ScheduleConfig, draw_timesteps
from .base import (AutoencoderConfig, Demo, Family, GuidedConfig, LearningRates, Pretrained, Sampler,
                                        SamplingDefaults, VLMEncoderConfig, lr_groups, make_sampler, part)


class LR(LearningRates):
    connector: float = Field(3e-6, ge=0, description="Table 1: ViT-to-VLM MLP LoRA")
    lm: float = Field(3e-6, ge=0, description="Table 1: VLM LoRA")
    adapter: float = Field(1e-5, ge=0, description="Table 1: adapter, fully trained")
    unet: float = Field(5e-6, ge=0, description="Table 1: UNet LoRA")


class Sampling(SamplingDefaults):
    sampler: Sampler = Field("ddim", description="section 2.1: DDIM")
    steps: int = Field(50, gt=0, description="section 2.1: 50 steps")
    guidance: float = Field(6.0, ge=0, description="classifier-free guidance scale (section 2.1 uses guidance, states no scale: 6 is mmloom's choice)")


class Config(GuidedConfig):
    RENAMED: ClassVar[dict[str, str]] = {
        "vlm": "encoder.path", "vlm_image_size": "encoder.image_size", "bypass_resampler": "encoder.bypass_resampler",
    }

    encoder: VLMEncoderConfig = part(VLMEncoderConfig, "the vision-language model (image-text-to-text; image_size null: prompt.crop_size; "
                                     "bypass_resampler, section 3)", path="HuggingFaceM4/idefics2-8b", bypass_resampler=True)
    backbone: Pretrained = part(Pretrained, "diffusers UNet2DConditionModel (SDXL's, section 3)",
                                path="stabilityai/stable-diffusion-xl-base-1.0", subfolder="unet")
    autoencoder: AutoencoderConfig = part(AutoencoderConfig, "diffusers autoencoder (SDXL's AutoencoderKL)",
                                          path="stabilityai/stable-diffusion-xl-base-1.0", subfolder="vae")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="DDPM schedule (SD / SDXL)")
    cond_dropout: float = Field(0.1, ge=0, le=1, description="prompt replaced by the empty prompt (classifier-free guidance)")
    adapter_layers: int = Field(16, gt=0, description="non-causal adapter transformer layers (section 3: 16)")
    adapter_heads: int = Field(16, gt=0, description="adapter attention heads (must divide the UNet's cross-attention dim)")
    lora_rank: int = Field(8, gt=0, description="LoRA rank for the connector, language model and UNet (Table 1: 8)")
    lora_connector: str = Field(r".*connector\..*(gate_proj|up_proj|down_proj|q_proj|k_proj|v_proj|o_proj)", description="regex of connector modules given LoRA")
    lora_lm: str = Field(r".*text_model\..*(q_proj|k_proj|v_proj|o_proj)", description="regex of language-model modules given LoRA")
    lora_unet: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], description="UNet attention modules given LoRA")
    lr: LR = Field(default_factory=LR, description="learning rate per parameter group (Table 1; 0: the group is left out)")
    sampling: Sampling = Field(default_factory=Sampling, description="sampling defaults (section 2.1)")


class Adapter(nn.Module):
    """Non-causal transformer: encoder states -> UNet context (+ SDXL pooled embedding).

    The paper says only "a 16 layer non-causal transformer" (section 3). Chosen here: a
    linear map from the VLM's width to the UNet's cross-attention width, then standard
    pre-norm encoder layers (GELU, a 4x MLP, no dropout: the usual transformer block, which
    trains stably from scratch at the small learning rate of Table 1) and a final LayerNorm;
    SDXL's pooled text embedding is a linear map of the mean over the prompt's real tokens."""

    def __init__(self, in_dim: int, out_dim: int, layers: int, heads: int, pooled_dim: int | None):
        super().__init__()
        if out_dim % heads:
            raise UserError(f"model.adapter_heads ({heads}) must divide the UNet's cross-attention dim ({out_dim})")
        self.proj_in = nn.Linear(in_dim, out_dim)
        layer = nn.TransformerEncoderLayer(out_dim, heads, 4 * out_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(out_dim)
        self.pool = nn.Linear(out_dim, pooled_dim) if pooled_dim else None

    def forward(self, h: torch.Tensor, mask: torch.Tensor):
        x = self.proj_in(h)  # [B, L, D]
        x = self.norm(self.blocks(x, src_key_padding_mask=~mask.bool()))  # no causal mask
        pooled = None
        if self.pool is not None:
            m = mask.unsqueeze(-1).to(x.dtype)
            pooled = self.pool((x * m).sum(1) / m.sum(1).clamp(min=1))  # [B, pooled_dim]
        return x, pooled


class MumuModel(nn.Module):
    def __init__(self, cfg: Config, crop_size: int, gradient_checkpointing: bool = False):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        from ..diffusion import Autoencoder, ddpm, load_unet
        from ..encoders import VLMEncoder
        from ...testkit.tiny_train import resolve_tiny

        self.cfg = cfg
        enc = cfg.encoder
        self.encoder = VLMEncoder(resolve_tiny(enc.path), enc.bypass_resampler, enc.image_size or crop_size)
        self.unet = load_unet(cfg.backbone.path, cfg.backbone.subfolder)
        self.ae = Autoencoder(cfg.autoencoder.path, cfg.autoencoder.subfolder, cfg.autoencoder.type)
        self.noise_scheduler = ddpm(cfg.schedule)
        uc = self.unet.config
        self.sdxl = uc.addition_embed_type == "text_time"
        pooled = uc.projection_class_embeddings_input_dim - 6 * uc.addition_time_embed_dim if self.sdxl else None
        self.adapter = Adapter(self.encoder.hidden_size, uc.cross_attention_dim, cfg.adapter_layers, cfg.adapter_heads, pooled)

        # Table 1: freeze, then add rank-8 LoRA to the connector, the LM and the UNet
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.adapter.parameters():
            p.requires_grad_(True)
        lora = dict(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian")
        inject_adapter_in_model(LoraConfig(target_modules=f"({cfg.lora_connector})|({cfg.lora_lm})", **lora), self.encoder.model)
        self.unet.add_adapter(LoraConfig(target_modules=cfg.lora_unet, **lora))
        for n, p in self.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
        for p in self.encoder.vision_parameters():  # the vision tower stays frozen, LoRA or not
            p.requires_grad_(False)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.encoder.model.gradient_checkpointing_enable()

    # -- conditioning ----------------------------------------------------------------
    def condition(self, prompts: list[list]):
        h, mask = self.encoder(prompts)  # [B, L, D_vlm]
        ctx, pooled = self.adapter(h.float(), mask)  # [B, L, D_cross]
        return ctx, mask, pooled

    def _added(self, pooled, batch: int, height: int, width: int, device):
        if not self.sdxl:
            return None
        # SDXL size conditioning: original size, crop top-left, target size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=device).repeat(batch, 1)
        return {"text_embeds": pooled, "time_ids": time_ids}

    def forward(self, batch: dict) -> dict:
        """Training loss for one batch: {'loss': mse of the noise prediction}."""
        pixels = batch["pixels"].to(self.unet.device)
        prompts = [p.parts for p in batch["prompts"]]
        drop = (torch.rand(len(prompts)) < self.cfg.cond_dropout).tolist()  # classifier-free guidance
        prompts = [[""] if d else p for p, d in zip(prompts, drop)]
        latents = self.ae.encode(pixels)
        noise = torch.randn_like(latents)
        t = draw_timesteps(self.noise_scheduler.config.num_train_timesteps, latents)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        ctx, mask, pooled = self.condition(prompts)
        pred = self.unet(noisy, t, encoder_hidden_states=ctx.to(noisy.dtype), encoder_attention_mask=mask,
                         added_cond_kwargs=self._added(pooled, len(prompts), pixels.shape[-2], pixels.shape[-1], noisy.device)).sample
        return {"loss": F.mse_loss(pred.float(), noise.float())}

    @torch.no_grad()
    def generate(self, prompts: list[list], steps: int | None = None, guidance: float | None = None,
                 seeds: list[int] | None = None, size: int | None = None):
        from ..diffusion import guided_sample, to_pil

        sampling = self.cfg.sampling
        steps = sampling.steps if steps is None else steps
        guidance = sampling.guidance if guidance is None else guidance
        seeds = seeds or list(range(len(prompts)))
        size = size or self.unet.config.sample_size * self.ae.downscale
        dev = self.unet.device
        ctx, mask, pooled = self.condition(prompts)
        uctx, umask, upooled = self.condition([[""]] * len(prompts))
        cond = dict(encoder_hidden_states=ctx, encoder_attention_mask=mask,
                    added_cond_kwargs=self._added(pooled, len(prompts), size, size, dev))
        uncond = dict(encoder_hidden_states=uctx, encoder_attention_mask=umask,
                      added_cond_kwargs=self._added(upooled, len(prompts), size, size, dev))
        h = size // self.ae.downscale
        lat = guided_sample(make_sampler(sampling.sampler, self.noise_scheduler.config), steps, (self.unet.config.in_channels, h, h),
                            seeds, dev, guidance, lambda x, t: self.unet(x, t, **cond).sample,
                            lambda x, t: self.unet(x, t, **uncond).sample)
        return to_pil(self.ae.decode(lat))


class Mumu(Family):
    name = "mumu"
    title = "MUMU: a VLM's view of the interleaved prompt through an adapter into an SDXL/SD UNet"
    Config = Config
    demo = Demo(["mumu-tiny"], "tiny MUMU (random-init Idefics2 + adapter + UNet + VAE)", prompt_images=2)

    def build(self, cfg, train_cfg) -> MumuModel:
        p = train_cfg.prompt
        return MumuModel(self.config(cfg), p.crop_size if p.stage == 1 else p.stage2_crop_size, train_cfg.loop.gradient_checkpointing)

    def param_groups(self, model: MumuModel, cfg) -> list[dict]:
        groups = {"connector": [], "lm": [], "adapter": [], "unet": []}
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if n.startswith("adapter."):
                groups["adapter"].append(p)
            elif n.startswith("unet."):
                groups["unet"].append(p)
            elif ".connector." in n:
                groups["connector"].append(p)
            else:
                groups["lm"].append(p)
        return lr_groups(groups, model.cfg.lr)

    def demo_prompt(self, paths: list[str]) -> str:
        if not paths:
            return "a red circle"
        return "a photo of " + " and ".join(f"<image:{p}> thing {i}" for i, p in enumerate(paths))


FAMILY = Mumu()
