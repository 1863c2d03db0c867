"""M-VADER (M-VADER: A Model for Diffusion with Multimodal Context): a diffusion model
conditioned on a decoder language model's view of interleaved images and text.

* Condition (section 3.1): the last hidden states of a decoder LM that reads images and
  text (any transformers image-text-to-text model; MAGMA/Luminous in the paper), fed to
  every UNet cross-attention layer through newly trained key and value projections.
* Training (section 3.2, appendix D): each image-caption pair is conditioned on either
  its image (probability 0.2) or its caption; embedding dropout (0.05 or 0.1, Table 2)
  replaces a sample's conditioning with the empty prompt, which is what classifier-free
  guidance needs at inference; learning rates: new cross-attention 5e-4 or 1e-4, UNet
  5e-5; the language model frozen, or its biases trained (BitFit, the paper's semantic
  biases).
* Inference (sections 3.3, 3.4): any interleaving of text and images; "a guidance scale
  of 8.0 and [...] 50 steps with the pseudo-numerical method" (PNDM, section 3.3), the
  family's sampling defaults; attention manipulation in every cross-attention layer,
  s_ij + log(theta_i), with theta given per prompt segment (a float for every image
  segment, "down-weight all image tokens to 0.5", or one value per segment); theta 0
  removes a segment, theta 1 changes nothing. One image alone gives variations, several
  a composition.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmloom.errors import UserError
from ..diffusion import Autoencoder, ScheduleConfig, ddpm, draw_timesteps, guided_sample, load_unet, to_pil
from .base import (AutoencoderConfig, Demo, Family, GuidedConfig, LearningRates, Pretrained, Sampler,
                                        SamplingDefaults, VLMEncoderConfig, lr_groups, make_sampler, part)


class LR(LearningRates):
    cross_attn: float = Field(1e-4, ge=0, description="new cross-attention projections (Table 2: 5e-4 V1, 1e-4 V2)")
    unet: float = Field(5e-5, ge=0, description="the rest of the UNet (Table 2: 5e-5)")
    encoder: float = Field(1e-5, ge=0, description="language-model biases when encoder_training is bias")


class Sampling(SamplingDefaults):
    sampler: Sampler = Field("pndm", description="section 3.3: the pseudo-numerical method (PNDM)")
    steps: int = Field(50, gt=0, description="section 3.3: 50 steps")
    guidance: float = Field(8.0, ge=0, description="section 3.3: classifier-free guidance scale 8.0")


class Config(GuidedConfig):
    RENAMED: ClassVar[dict[str, str]] = {
        "lm": "encoder.path", "lm_image_size": "encoder.image_size", "bypass_resampler": "encoder.bypass_resampler",
        "embedding_dropout": "cond_dropout",
    }

    encoder: VLMEncoderConfig = part(VLMEncoderConfig, "decoder LM that reads interleaved images and text (image-text-to-text; "
                                     "image_size null: data.resolution; bypass_resampler false: the perceiver's tokens, "
                                     "as MAGMA's 144 per image)", path="HuggingFaceM4/idefics2-8b", bypass_resampler=False)
    backbone: Pretrained = part(Pretrained, "diffusers UNet2DConditionModel (section 3.1: Stable Diffusion 1.4)",
                                path="CompVis/stable-diffusion-v1-4", subfolder="unet")
    autoencoder: AutoencoderConfig = part(AutoencoderConfig, "diffusers autoencoder (Stable Diffusion 1.4's AutoencoderKL)",
                                          path="CompVis/stable-diffusion-v1-4", subfolder="vae")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="DDPM schedule (Stable Diffusion's)")
    image_prob: float = Field(0.2, ge=0, le=1, description="a pair is conditioned on its image with this probability, else its caption (section 3.2)")
    cond_dropout: float = Field(0.1, ge=0, le=1, description="embedding dropout: conditioning replaced by the empty prompt (Table 2: 0.05 V1, 0.1 V2)")
    encoder_training: Literal["frozen", "bias"] = Field("frozen", description="language model frozen, or its biases trained (BitFit)")
    lr: LR = Field(default_factory=LR, description="learning rate per parameter group (0: the group is left out)")
    image_theta: float = Field(1.0, ge=0, description="sampling: attention factor theta for every image segment (section 3.4; e.g. 0.5)")
    sampling: Sampling = Field(default_factory=Sampling, description="sampling defaults (section 3.3)")


class ThetaBias:
    """The current log(theta) per context token ([B, L]), shared by every processor."""

    def __init__(self):
        self.log_theta: torch.Tensor | None = None


class ThetaAttnProcessor(nn.Module):
    """Scaled dot-product cross-attention with s_ij + log(theta_j) (equation 2)."""

    def __init__(self, holder: ThetaBias):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()
        self.holder = holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        lt = self.holder.log_theta
        if lt is not None and encoder_hidden_states is not None:
            bias = lt.to(hidden_states.dtype)[:, None, :]  # [B, 1, L], as the UNet passes its mask
            attention_mask = bias if attention_mask is None else attention_mask + bias
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)


def log_theta(segments: torch.Tensor, theta: list[float]) -> torch.Tensor:
    """Per-token log(theta) from per-token segment indices ([B, L], -1 = no segment) and
    per-segment factors; theta 0 gives -inf (the token gets no attention at all)."""
    table = torch.tensor([*theta, 1.0], dtype=torch.float32)  # index -1 -> the trailing 1.0
    with torch.no_grad():
        return torch.log(table[segments.clamp(min=-1)])


class MVaderModel(nn.Module):
    def __init__(self, cfg: Config, resolution: int):
        super().__init__()
        from ..encoders import VLMEncoder
        from ...testkit.tiny_train import resolve_tiny

        self.cfg = cfg
        enc = cfg.encoder
        self.encoder = VLMEncoder(resolve_tiny(enc.path), enc.bypass_resampler, enc.image_size or resolution)
        self.unet = load_unet(cfg.backbone.path, cfg.backbone.subfolder)
        self.ae = Autoencoder(cfg.autoencoder.path, cfg.autoencoder.subfolder, cfg.autoencoder.type)
        self.noise_scheduler = ddpm(cfg.schedule)
        self.theta = ThetaBias()
        # newly trained key/value projections from the LM's width in every cross-attention
        self.cross_names = []
        for name, mod in self.unet.named_modules():
            if name.endswith("attn2") and hasattr(mod, "to_k"):
                mod.to_k = nn.Linear(self.encoder.hidden_size, mod.to_k.out_features, bias=False)
                mod.to_v = nn.Linear(self.encoder.hidden_size, mod.to_v.out_features, bias=False)
                mod.set_processor(ThetaAttnProcessor(self.theta))
                self.cross_names += [f"unet.{name}.to_k.", f"unet.{name}.to_v."]
        if not self.cross_names:
            raise UserError(f"model.backbone.path {cfg.backbone.path} has no cross-attention layers to condition")
        self.encoder.requires_grad_(False)
        if cfg.encoder_training == "bias":
            for n, p in self.encoder.model.named_parameters():
                if n.endswith(".bias"):
                    p.requires_grad_(True)

    # -- conditioning ---------------------------------------------------------------------
    def draw_conditions(self, n: int) -> list[str]:
        """Per sample: 'image' (probability image_prob), 'caption', or 'empty' (embedding
        dropout, ``cond_dropout``)."""
        out = []
        for _ in range(n):
            if float(torch.rand(())) < self.cfg.cond_dropout:
                out.append("empty")
            else:
                out.append("image" if float(torch.rand(())) < self.cfg.image_prob else "caption")
        return out

    def encode(self, prompts: list[list]):
        h, mask = self.encoder(prompts)
        return h.float(), mask

    def segments(self, prompts: list[list], ids: torch.Tensor) -> torch.Tensor:
        """Per-token segment index ([B, L], -1 outside any part) of the LM input ``ids``
        the encoder just read: image tokens (and the special tokens wrapped around them)
        belong to their image, text tokens to the text part around them."""
        from PIL import Image

        tok = self.encoder.processor.tokenizer
        image_id = tok.convert_tokens_to_ids(self.encoder.image_token)
        plain = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        wraps = set(tok.all_special_ids)
        for attr in ("fake_image_token", "global_image_token", "boi_token", "eoi_token", "image_start_token", "image_end_token"):
            w = getattr(self.encoder.processor, attr, None)
            if w is not None:
                wraps.add(tok.convert_tokens_to_ids(getattr(w, "content", w)))
        wraps -= plain | {image_id, tok.unk_token_id}  # an unknown word is still its text part's
        out = torch.full(ids.shape, -1, dtype=torch.long)
        for b, parts in enumerate(prompts):
            image_parts = [i for i, p in enumerate(parts) if isinstance(p, Image.Image)]
            text_parts = [i for i, p in enumerate(parts) if isinstance(p, str) and p]
            row = ids[b].tolist()
            run, prev_image = -1, False
            for j, t in enumerate(row):
                if t == image_id:
                    run += 0 if prev_image else 1
                    prev_image = True
                    out[b, j] = image_parts[run] if run < len(image_parts) else -1
                    continue
                prev_image = False
                if t in plain or t in wraps:
                    continue
                after = image_parts[run] if 0 <= run < len(image_parts) else -1
                out[b, j] = next((i for i in text_parts if i > after), -1)
            for j, t in enumerate(row):  # wrapping tokens join the image next to them
                if t in wraps:
                    if j + 1 < len(row) and row[j + 1] == image_id:
                        out[b, j] = out[b, j + 1]
                    elif j > 0 and row[j - 1] == image_id:
                        out[b, j] = out[b, j - 1]
        return out

    # -- training -----------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        pixels = batch["pixels"].to(self.unet.device)
        kinds = self.draw_conditions(len(pixels))
        pictures = to_pil(pixels)
        prompts = [[pictures[i]] if k == "image" else [batch["captions"][i]] if k == "caption" else [""]
                   for i, k in enumerate(kinds)]
        latents = self.ae.encode(pixels)
        noise = torch.randn_like(latents)
        t = draw_timesteps(self.noise_scheduler.config.num_train_timesteps, latents)
        ctx, mask = self.encode(prompts)
        self.theta.log_theta = None
        pred = self.unet(self.noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=ctx.to(latents.dtype),
                         encoder_attention_mask=mask).sample
        return {"loss": F.mse_loss(pred.float(), noise.float()),
                "image_conditioned": torch.tensor(sum(k == "image" for k in kinds) / len(kinds))}

    # -- inference ------------------------------------------------------------------------------
    def theta_for(self, prompts: list[list], theta) -> torch.Tensor | None:
        """log(theta) per token: ``theta`` a float (every image segment) or per-segment lists."""
        from PIL import Image

        if theta is None:
            theta = self.cfg.image_theta
        if isinstance(theta, (int, float)):
            if theta == 1.0:
                return None
            per = [[float(theta) if isinstance(p, Image.Image) else 1.0 for p in parts] for parts in prompts]
        else:
            per = [list(map(float, t)) for t in theta]
            for parts, t in zip(prompts, per):
                if len(t) != len(parts):
                    raise UserError(f"theta has {len(t)} value(s) for a prompt of {len(parts)} segment(s)")
        seg = self.segments(prompts, self.encoder.last_input_ids.cpu())
        return torch.stack([log_theta(seg[i:i + 1], per[i])[0] for i in range(len(prompts))])

    @torch.no_grad()
    def generate(self, prompts: list[list], steps: int | None = None, guidance: float | None = None, seeds=None,
                 size: int | None = None, theta=None):
        sampling = self.cfg.sampling
        steps = sampling.steps if steps is None else steps
        guidance = sampling.guidance if guidance is None else guidance
        dev = self.unet.device
        seeds = seeds or list(range(len(prompts)))
        size = size or self.unet.config.sample_size * self.ae.downscale
        sched = make_sampler(sampling.sampler, self.noise_scheduler.config)
        ctx, mask = self.encode(prompts)
        lt = self.theta_for(prompts, theta)  # from the token layout the encoder just read
        lt = None if lt is None else lt.to(dev)
        uctx, umask = self.encode([[""]] * len(prompts))

        def cond(x, t):  # attention manipulation on the prompt's pass only
            self.theta.log_theta = lt
            try:
                return self.unet(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
            finally:
                self.theta.log_theta = None

        def uncond(x, t):
            return self.unet(x, t, encoder_hidden_states=uctx, encoder_attention_mask=umask).sample

        h = size // self.ae.downscale
        lat = guided_sample(sched, steps, (self.unet.config.in_channels, h, h), seeds, dev, guidance, cond, uncond)
        return to_pil(self.ae.decode(lat))


class MVader(Family):
    name = "mvader"
    title = "M-VADER: a multimodal decoder LM's hidden states into new cross-attention of an SD UNet"
    Config = Config
    demo = Demo(["mvader-tiny"], "tiny M-VADER (random-init Idefics2 as the multimodal LM, new cross-attention, UNet + VAE)",
                prompt_images=2, note="image tokens down-weighted to theta 0.5 (composition)", options={"theta": [0.5]})
    options = frozenset({"theta"})

    def build(self, cfg, train_cfg) -> MVaderModel:
        return MVaderModel(self.config(cfg), train_cfg.data.resolution)

    def param_groups(self, model: MVaderModel, cfg) -> list[dict]:
        groups = {"cross_attn": [], "unet": [], "encoder": []}
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if any(n.startswith(c) for c in model.cross_names):
                groups["cross_attn"].append(p)
            elif n.startswith("unet."):
                groups["unet"].append(p)
            else:
                groups["encoder"].append(p)
        return lr_groups(groups, model.cfg.lr)

    def demo_prompt(self, paths: list[str]) -> str:
        return f"a photo of <image:{paths[0]}> in the style of <image:{paths[1]}>" if len(paths) > 1 else "a red circle"


FAMILY = MVader()
