"""MUMU (Berman and Peysakhovich, 2024; ARCHITECTURE.md, Papers): a vision-language model encodes the interleaved prompt, a small
non-causal "adapter" transformer maps its hidden states into the UNet's cross-attention
(section 3), and a diffusers UNet2DConditionModel denoises AutoencoderKL latents with
epsilon prediction, MSE and a DDPM schedule (section 2.1). Table 1: vision tower frozen;
rank-8 LoRA on the connector (3e-6), the language model (3e-6) and the UNet (5e-6); the
adapter fully trained (1e-5). Sampling: DDIM, 50 steps, guidance 6 (sections 2.1, 6).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmloom.configbase import Section
from mmloom.errors import UserError


class Config(Section):
    vlm: str = Field("HuggingFaceM4/idefics2-8b", description="vision-language model (image-text-to-text): hub id or local dir")
    vlm_image_size: Optional[int] = Field(None, gt=0, description="VLM input size for each image (default: prompt.crop_size)")
    bypass_resampler: bool = Field(True, description="Idefics2: drop the perceiver, one token per patch (section 3)")
    unet: str = Field("stabilityai/stable-diffusion-xl-base-1.0", description="diffusers UNet2DConditionModel: hub id or dir")
    unet_subfolder: Optional[str] = Field("unet", description="subfolder of the UNet inside `unet`")
    vae: str = Field("stabilityai/stable-diffusion-xl-base-1.0", description="diffusers AutoencoderKL: hub id or dir")
    vae_subfolder: Optional[str] = Field("vae", description="subfolder of the VAE inside `vae`")
    adapter_layers: int = Field(16, gt=0, description="non-causal adapter transformer layers (section 3: 16)")
    adapter_heads: int = Field(16, gt=0, description="adapter attention heads (must divide the UNet's cross-attention dim)")
    lora_rank: int = Field(8, gt=0, description="LoRA rank for the connector, language model and UNet (Table 1: 8)")
    lora_connector: str = Field(r".*connector\..*(gate_proj|up_proj|down_proj|q_proj|k_proj|v_proj|o_proj)", description="regex of connector modules given LoRA")
    lora_lm: str = Field(r".*text_model\..*(q_proj|k_proj|v_proj|o_proj)", description="regex of language-model modules given LoRA")
    lora_unet: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], description="UNet attention modules given LoRA")
    lr_connector: float = Field(3e-6, gt=0, description="Table 1: ViT-to-VLM MLP LoRA")
    lr_lm: float = Field(3e-6, gt=0, description="Table 1: VLM LoRA")
    lr_adapter: float = Field(1e-5, gt=0, description="Table 1: adapter, fully trained")
    lr_unet: float = Field(5e-6, gt=0, description="Table 1: UNet LoRA")
    num_train_timesteps: int = Field(1000, gt=0, description="DDPM steps")
    beta_schedule: str = Field("scaled_linear", description="DDPM beta schedule (SD / SDXL)")
    beta_start: float = Field(0.00085, gt=0, description="first DDPM beta (SD)")
    beta_end: float = Field(0.012, gt=0, description="last DDPM beta (SD)")


class Adapter(nn.Module):
    """Non-causal transformer: encoder states -> UNet context (+ SDXL pooled embedding)."""

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
    def __init__(self, cfg: Config, crop_size: int, cond_dropout: float, gradient_checkpointing: bool = False):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        from mmloom.train.diffusion import Autoencoder, ScheduleConfig, ddpm, load_unet
        from mmloom.train.encoders import VLMEncoder
        from mmloom.train.tiny import resolve_tiny

        self.cfg, self.cond_dropout = cfg, cond_dropout
        self.encoder = VLMEncoder(resolve_tiny(cfg.vlm), cfg.bypass_resampler, cfg.vlm_image_size or crop_size)
        self.unet = load_unet(cfg.unet, cfg.unet_subfolder)
        self.ae = Autoencoder(cfg.vae, cfg.vae_subfolder, "kl")
        self.noise_scheduler = ddpm(ScheduleConfig(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                                   beta_start=cfg.beta_start, beta_end=cfg.beta_end))
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
        drop = (torch.rand(len(prompts)) < self.cond_dropout).tolist()  # classifier-free guidance
        prompts = [[""] if d else p for p, d in zip(prompts, drop)]
        latents = self.ae.encode(pixels)
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        ctx, mask, pooled = self.condition(prompts)
        pred = self.unet(noisy, t, encoder_hidden_states=ctx.to(noisy.dtype), encoder_attention_mask=mask,
                         added_cond_kwargs=self._added(pooled, len(prompts), pixels.shape[-2], pixels.shape[-1], noisy.device)).sample
        return {"loss": F.mse_loss(pred.float(), noise.float())}

    @torch.no_grad()
    def generate(self, prompts: list[list], steps: int = 50, guidance: float = 6.0, seeds: list[int] | None = None,
                 size: int | None = None):
        from diffusers import DDIMScheduler

        from mmloom.train.diffusion import guided_sample, to_pil

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
        lat = guided_sample(DDIMScheduler.from_config(self.noise_scheduler.config), steps, (self.unet.config.in_channels, h, h),
                            seeds, dev, guidance, lambda x, t: self.unet(x, t, **cond).sample,
                            lambda x, t: self.unet(x, t, **uncond).sample)
        return to_pil(self.ae.decode(lat))


def build(model_cfg: dict, train_cfg) -> MumuModel:
    from mmloom.configbase import load_model

    cfg = load_model(Config, data=model_cfg)
    return MumuModel(cfg, train_cfg.prompt.crop_size if train_cfg.prompt.stage == 1 else train_cfg.prompt.stage2_crop_size,
                     train_cfg.prompt.cond_dropout, train_cfg.loop.gradient_checkpointing)


def param_groups(model: MumuModel, model_cfg: dict) -> list[dict]:
    cfg = model.cfg
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
    lrs = {"connector": cfg.lr_connector, "lm": cfg.lr_lm, "adapter": cfg.lr_adapter, "unet": cfg.lr_unet}
    return [{"name": k, "params": v, "lr": lrs[k]} for k, v in groups.items() if v]


def generate(model: MumuModel, prompts, steps=50, guidance=6.0, seeds=None, size=None):
    return model.generate(prompts, steps, guidance, seeds, size)
