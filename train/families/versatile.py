"""Versatile Diffusion (Versatile Diffusion: Text, Images and Variations All in One
Diffusion Model): one multi-flow diffuser for text-to-image, image variation,
image-to-text and text variation.

Multi-flow UNet (sections 3.2, 3.3): layers fall in three groups. Global layers (the time
embedding) always run. Data layers belong to an output type: the image UNet's ResBlocks
for image latents, FCResBlocks (diffusers' flat UNet: fully connected residual blocks with
GroupNorm and SiLU) for text latents. Context layers belong to a context type: one set of
cross-attention blocks for CLIP text embeddings, one for CLIP image embeddings (global
vector + patch tokens, 257 x 768 for ViT-L/14). A flow (output, context) runs the global
layers, its output's data layers and its context's context layers only.

Training sums the losses, and so the gradients, of every flow before one update
(Algorithm 1), with one learning rate per layer group: section 4.2's base rate (5e-5
for four flows) times Table 1's gradient scale (four-flow: data image 0.2, data text
1.0, contexts 1.0, global 0.1), so ``lr.data_image`` is 1e-5 and ``lr.global_layers`` 5e-6. Text latents come from a text VAE of
Optimus's design (``train/text_vae.py``); image latents from AutoencoderKL; contexts are
CLIP's projected token embeddings divided by the norm of the global one (section 3.3).

Inference (appendices A, B): dual-context blending of one image and one text, mixing the
two context layers' outputs in every attention block (attention-level, ``mix_rate``) or
alternating them by layer (layer-level); multi-context from several images concatenated,
each scaled; style/semantic disentanglement by keeping (style) or removing (semantics)
the first principal components of the image patch tokens, the global vector untouched;
the unconditional image context is CLIP of an all-zero image or all-zero embeddings.

Released checkpoint (shi-labs/versatile-diffusion; diffusers' VersatileDiffusion
pipelines): ``image_unet/`` holds the image data layers and the image context layers (its
own cross-attention blocks), ``text_unet/`` (UNetFlatConditionModel, flat in_channels
[768, 1, 1]: one Optimus latent per sample) the text data layers and the text context
layers (its cross-attention blocks), as the text-to-image pipeline swaps them in and the
dual-guided one pairs them. Both UNets carry a time embedding; the paper shares one set
of global layers, so mmloom keeps the image UNet's (the one every image flow of the
released pipelines runs) and leaves the text UNet's copy unused. Schedule: section 4.2
says "linearly increasing beta from 8.5e-5 to 1.2e-2 ... similar to DDPM and SD"; SD's
schedule, which VD fine-tunes from, is the square-root-linear one (diffusers'
scaled_linear) from 8.5e-4 to 1.2e-2, and mmloom uses it (the 8.5e-5 reads as a typo).
Dual-context guidance: the paper does not say what the unconditional pass of blending
sees; mmloom blends both unconditional contexts at the same rate, as the released
dual-guided pipeline does.

Sampling: the paper states neither sampler, steps nor guidance scale (Figure 6 sweeps
the scale). mmloom samples images with DDIM, 50 steps, guidance 7.5, the settings of
the released model's pipelines (diffusers' VersatileDiffusion pipelines) and of Stable
Diffusion 1.4, VD's starting point; text outputs with guidance 2.0 (mmloom's choice: a
low scale keeps the decoded sentences fluent on small text VAEs).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmloom.errors import UserError
from ..diffusion import Autoencoder, ScheduleConfig, ddpm, draw_timesteps, guided_sample, to_pil
from .base import (AutoencoderConfig, ClipEncoderConfig, Demo, Family, GuidedConfig, LearningRates,
                                        Pretrained, Sampler, SamplingDefaults, lr_groups, make_sampler, part)

FLOWS = {  # name -> (output data type, context type)
    "text_to_image": ("image", "text"),
    "image_variation": ("image", "image"),
    "image_to_text": ("text", "image"),
    "text_variation": ("text", "text"),
}


class Schedule(ScheduleConfig):
    beta_schedule: str = Field("scaled_linear", description="section 4.2: SD's betas over 1000 steps, square-root-linear (scaled_linear) from 8.5e-4 to 1.2e-2")


class LR(LearningRates):
    """Section 4.2's four-flow rate 5e-5 times Table 1's four-flow gradient scales."""

    data_image: float = Field(1e-5, ge=0, description="image data layers (Table 1: 0.2 x 5e-5; 1-2 flows: 0.1 x 1e-4)")
    data_text: float = Field(5e-5, ge=0, description="text data layers, FCResBlocks (Table 1: 1.0 x 5e-5)")
    context_image: float = Field(5e-5, ge=0, description="image context layers (Table 1: 1.0 x 5e-5)")
    context_text: float = Field(5e-5, ge=0, description="text context layers (Table 1: 1.0 x 5e-5)")
    global_layers: float = Field(5e-6, ge=0, description="global layers, the time embedding (Table 1: 0.1 x 5e-5)")


class Sampling(SamplingDefaults):
    sampler: Sampler = Field("ddim", description="the paper states none: DDIM, as the released pipelines")
    steps: int = Field(50, gt=0, description="the paper states none: 50, as the released pipelines")
    guidance: float = Field(7.5, ge=0, description="image outputs (the paper states none, Figure 6 sweeps it): 7.5, as the released pipelines")
    text_guidance: float = Field(2.0, ge=0, description="text outputs (image-to-text, text variation; mmloom's choice)")


class Config(GuidedConfig):
    RENAMED: ClassVar[dict[str, str]] = {
        "image_unet": "backbone.path", "image_unet_subfolder": "backbone.subfolder", "text_unet": "text_backbone.path",
        "text_unet_subfolder": "text_backbone.subfolder", "clip": "encoder.path", "context_dropout": "cond_dropout",
        **{f"lr_scale_{g}": f"lr.{g} (a rate now: the old lr x this scale)" for g in ("data_image", "data_text", "context_image", "context_text")},
        "lr_scale_global": "lr.global_layers (a rate now: the old lr x this scale)",
    }

    encoder: ClipEncoderConfig = part(ClipEncoderConfig, "open_clip model for both context encoders", path="ViT-L-14/openai")
    backbone: Pretrained = part(Pretrained, "image data layers: diffusers UNet2DConditionModel",
                                path="shi-labs/versatile-diffusion", subfolder="image_unet")
    text_backbone: Pretrained = part(Pretrained, "text data layers: diffusers UNetFlatConditionModel (FCResBlocks)",
                                     path="shi-labs/versatile-diffusion", subfolder="text_unet")
    autoencoder: AutoencoderConfig = part(AutoencoderConfig, "image VAE: diffusers AutoencoderKL",
                                          path="shi-labs/versatile-diffusion", subfolder="vae")
    text_vae: str = Field("", description="text VAE (Optimus design: BERT encoder, GPT-2 decoder) directory or hub repo; required for text flows")
    flows: list[Literal["text_to_image", "image_variation", "image_to_text", "text_variation"]] = Field(
        default_factory=lambda: list(FLOWS), description="flows trained together (four-flow VD by default)")
    schedule: Schedule = Field(default_factory=Schedule, description="DDPM schedule")
    lr: LR = Field(default_factory=LR, description="learning rate per layer group (section 4.2 x Table 1; 0: the group is left out)")
    cond_dropout: float = Field(0.1, ge=0, le=1, description="context replaced by the unconditional one (classifier-free guidance)")
    image_uncond: Literal["zero_image", "zero_embedding"] = Field("zero_image", description="unconditional image context: CLIP of an all-zero image, or all-zero embeddings (B.1)")
    mixing: Literal["attention", "layer"] = Field("attention", description="dual-context blending: attention-level or layer-level mixing (A.2)")
    mix_rate: float = Field(0.5, ge=0, le=1, description="dual-context blending: weight of the text context (0 image only, 1 text only)")
    pca: int = Field(0, description="image variation: k > 0 keeps only the first k principal components (style), k < 0 removes the first -k (semantics)")
    image_scales: list[float] = Field(default_factory=list, description="multi-context (A.3): one scale per prompt image at sampling (empty: all 1)")
    text_max_length: int = Field(32, gt=0, description="text outputs: most tokens decoded (the paper states none; mmloom's choice)")
    sampling: Sampling = Field(default_factory=Sampling, description="sampling defaults")


def _attention_paths(unet: nn.Module) -> list[str]:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class _Slot(nn.Module):
    """Where a context layer is plugged in for a flow; holds no parameters."""

    def forward(self, *a, **kw):
        raise RuntimeError("no context layer installed for this flow")


class AttentionMix(nn.Module):
    """Attention-level mixing: both context layers run on the same features and their
    outputs are summed with weights (1 - rate, rate)."""

    def __init__(self, image_layer: nn.Module, text_layer: nn.Module, rate: float):
        super().__init__()
        self.image_layer, self.text_layer, self.rate = image_layer, text_layer, rate
        self.image_ctx = self.text_ctx = None

    def forward(self, hidden_states, encoder_hidden_states=None, **kw):
        a = self.image_layer(hidden_states, encoder_hidden_states=self.image_ctx, **kw)
        b = self.text_layer(hidden_states, encoder_hidden_states=self.text_ctx, **kw)
        a = a[0] if isinstance(a, tuple) else a.sample
        b = b[0] if isinstance(b, tuple) else b.sample
        return ((1 - self.rate) * a + self.rate * b,)


class _WithContext(nn.Module):
    """A context layer fed its own context (layer-level mixing runs two kinds in turn)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer, self.ctx = layer, None

    def forward(self, hidden_states, encoder_hidden_states=None, **kw):
        return self.layer(hidden_states, encoder_hidden_states=self.ctx, **kw)


class MultiFlowUNet(nn.Module):
    """Global, data and context layers of section 3.2, assembled per flow."""

    def __init__(self, image_unet: nn.Module, text_unet: nn.Module):
        super().__init__()
        self.paths = _attention_paths(image_unet)
        if _attention_paths(text_unet) != self.paths:
            raise UserError("the text UNet's cross-attention blocks do not sit where the image UNet's do; "
                            "both UNets need the same block layout")
        if list(image_unet.config.block_out_channels) != list(text_unet.config.block_out_channels):
            raise UserError("the image and text UNets need the same block_out_channels (their context and global layers are shared)")
        # the released checkpoint's mapping (diffusers' VersatileDiffusion pipelines): each
        # UNet's own cross-attention blocks are the context layers of that UNet's context
        # type, the image UNet's for CLIP image contexts, the text UNet's for CLIP text
        self.context = nn.ModuleDict({
            "text": nn.ModuleList(text_unet.get_submodule(p) for p in self.paths),
            "image": nn.ModuleList(image_unet.get_submodule(p) for p in self.paths),
        })
        self.global_layers = image_unet.time_embedding  # the text UNet's copy is not used (one set of global layers)
        for unet in (image_unet, text_unet):
            for p in self.paths:
                _set(unet, p, _Slot())
            unet.time_embedding = _Slot()
        self.data = nn.ModuleDict({"image": image_unet, "text": text_unet})

    @contextmanager
    def flow(self, output: str, layers: list[nn.Module]):
        unet = self.data[output]
        for p, layer in zip(self.paths, layers):
            _set(unet, p, layer)
        unet.time_embedding = self.global_layers
        try:
            yield unet
        finally:
            for p in self.paths:
                _set(unet, p, _Slot())
            unet.time_embedding = _Slot()

    def forward(self, x, t, output: str, context: str, ctx: torch.Tensor):
        """One flow: ``output`` data layers, ``context`` context layers."""
        with self.flow(output, list(self.context[context])) as unet:
            return unet(x, t, encoder_hidden_states=ctx).sample

    def blend(self, x, t, output: str, image_ctx, text_ctx, rate: float, mode: str = "attention"):
        """Dual-context blending (A.2): attention-level or layer-level mixing."""
        if mode == "attention":
            layers = [AttentionMix(i, tx, rate) for i, tx in zip(self.context["image"], self.context["text"])]
            for m in layers:
                m.image_ctx, m.text_ctx = image_ctx, text_ctx
        else:  # layer-level: a preset schedule, about `rate` of the layers from the text context
            n = len(self.paths)
            text_at = text_layers(n, rate)
            layers = []
            for i in range(n):
                m = _WithContext(self.context["text" if i in text_at else "image"][i])
                m.ctx = text_ctx if i in text_at else image_ctx
                layers.append(m)
        with self.flow(output, layers) as unet:
            return unet(x, t, encoder_hidden_states=text_ctx).sample


def text_layers(n: int, rate: float) -> set[int]:
    """Layer-level mixing's preset schedule (A.2): the indices of the ``n`` context layers
    that take the text context, round(rate n) of them spread evenly from the first."""
    k = round(rate * n)
    return {round(i * n / k) for i in range(k)}  # k = 0: none


def text_latent_shape(text_unet: nn.Module) -> tuple[int, ...]:
    """The text UNet's latent shape per sample: its ``in_channels`` as given in the released
    flat layout (``[768, 1, 1]``: one 768-d Optimus latent), or ``[C, 4, 1]`` for an integer
    ``C`` (diffusers' LinearMultiDim reads it so)."""
    c = text_unet.config.in_channels
    return tuple(int(d) for d in c) if isinstance(c, (list, tuple)) else (int(c), 4, 1)


def disentangle(ctx: torch.Tensor, k: int) -> torch.Tensor:
    """A.1: PCA over the patch tokens of each image context (global vector kept as is):
    k > 0 keeps the first k principal components (style), k < 0 removes the first |k|
    (semantics), 0 leaves the context unchanged."""
    if k == 0:
        return ctx
    out = ctx.clone()
    for b in range(ctx.shape[0]):
        tokens = ctx[b, 1:].float()
        mean = tokens.mean(0, keepdim=True)
        _u, _s, v = torch.linalg.svd(tokens - mean, full_matrices=False)
        basis = v[:abs(k)]  # [k, D]; all of them when |k| is more than the tokens span
        proj = (tokens - mean) @ basis.T @ basis
        out[b, 1:] = (mean + proj if k > 0 else tokens - proj).to(ctx.dtype)
    return out


class VersatileModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        from diffusers import UNet2DConditionModel
        from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

        from mmloom.clip import ClipEmbedder
        from mmloom.models import hf_pretrained
        from ..text_vae import TextVAE
        from ...testkit.tiny_train import resolve_tiny

        self.cfg = cfg
        if not cfg.flows:
            raise UserError("model.flows is empty: name at least one of " + ", ".join(FLOWS))
        sub = lambda s: {"subfolder": s} if s else {}  # noqa: E731
        image_unet = hf_pretrained(UNet2DConditionModel, resolve_tiny(cfg.backbone.path), "image UNet", strict=True,
                                   **sub(cfg.backbone.subfolder))
        text_unet = hf_pretrained(UNetFlatConditionModel, resolve_tiny(cfg.text_backbone.path), "text UNet", strict=True,
                                  **sub(cfg.text_backbone.subfolder))
        self.unet = MultiFlowUNet(image_unet, text_unet)
        self.ae = Autoencoder(cfg.autoencoder.path, cfg.autoencoder.subfolder, cfg.autoencoder.type)
        self.clip = ClipEmbedder(resolve_tiny(cfg.encoder.path))
        self._uncond: dict[str, torch.Tensor] = {}  # kind -> CLIP of the empty text / the all-zero image
        needs_text = any(FLOWS[f][0] == "text" for f in cfg.flows)
        if needs_text and not cfg.text_vae:
            raise UserError("model.text_vae is empty: the image_to_text and text_variation flows need a text VAE")
        self.text_vae = TextVAE.load(resolve_tiny(cfg.text_vae)) if cfg.text_vae else None
        if self.text_vae is not None:
            self.text_vae.requires_grad_(False)
            shape = text_latent_shape(text_unet)
            if self.text_vae.latent_dim != math.prod(shape):
                raise UserError(f"the text VAE's {self.text_vae.latent_dim}-d latents do not fit the text UNet "
                                f"(latents {' x '.join(map(str, shape))} from its in_channels {text_unet.config.in_channels})")
        if image_unet.config.cross_attention_dim != self.clip.dim:
            raise UserError(f"the UNets' cross_attention_dim ({image_unet.config.cross_attention_dim}) must equal the CLIP "
                            f"embedding width ({self.clip.dim}) of model.encoder.path")
        self.sched = ddpm(cfg.schedule)

    # -- contexts ----------------------------------------------------------------------------
    def _dev(self):
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def text_context(self, texts: list[str]) -> torch.Tensor:
        """CLIP text tokens, projected, divided by the norm of the pooled embedding."""
        states, _mask, _pooled = self.clip.text_states(texts)
        m = self.clip.model
        proj = m.text_projection.weight.T if isinstance(m.text_projection, nn.Linear) else m.text_projection
        tokens = states @ proj.float().cpu()
        t = self.clip.tokens(texts)
        pooled = tokens[torch.arange(len(texts)), t.argmax(dim=-1)]  # the end-of-text token
        return (tokens / pooled.norm(dim=-1, keepdim=True)[:, None].clamp(min=1e-6)).to(self._dev())

    @torch.no_grad()
    def image_context(self, images) -> torch.Tensor:
        """CLIP image global vector + patch tokens, projected, divided by the global norm."""
        m = self.clip.model
        x = torch.stack([self.clip.preprocess(im) for im in images]).to(self.clip.device)
        m.visual.output_tokens = True
        try:
            pooled, tokens = m.visual(x)
        finally:
            m.visual.output_tokens = False
        if m.visual.proj is not None:
            tokens = tokens @ m.visual.proj
        ctx = torch.cat([pooled[:, None], tokens], dim=1).float().cpu()
        return (ctx / pooled.float().cpu().norm(dim=-1, keepdim=True)[:, None].clamp(min=1e-6)).to(self._dev())

    def uncond_context(self, kind: str, n: int) -> torch.Tensor:
        """The unconditional context, ``n`` times: CLIP of the empty text, or (B.1) CLIP of an
        all-zero image or all-zero embeddings. CLIP is frozen, so each is encoded once.

        The all-zero image is black, as B.1 (a) says. diffusers' released VD pipelines pass
        ``np.zeros((512, 512, 3)) + 0.5`` instead, but their CLIPImageProcessor rescales every
        input by 1/255, so the 0.5 reaches CLIP as 0.002: black as well, within 0.01 of
        mmloom's input after CLIP's normalization (a true mid-grey would be 1.8 away);
        tests/test_mechanisms.py checks both against the reference's processor."""
        if kind not in self._uncond:
            from PIL import Image

            self._uncond[kind] = self.text_context([""]) if kind == "text" else self.image_context([Image.new("RGB", (224, 224))])
        u = self._uncond[kind].to(self._dev())
        if kind == "image" and self.cfg.image_uncond == "zero_embedding":
            u = torch.zeros_like(u)
        return u.expand(n, -1, -1)

    # -- training (Algorithm 1) -------------------------------------------------------------------
    def _text_latents(self, texts: list[str]) -> torch.Tensor:
        z = self.text_vae.encode(texts).to(self._dev())
        return z.view(z.shape[0], *text_latent_shape(self.unet.data["text"]))

    def forward(self, batch: dict) -> dict:
        pixels = batch["pixels"].to(self._dev())
        captions = batch["captions"]
        data = {}
        if any(FLOWS[f][0] == "image" for f in self.cfg.flows):
            data["image"] = self.ae.encode(pixels)
        if any(FLOWS[f][0] == "text" for f in self.cfg.flows):
            data["text"] = self._text_latents(captions)
        ctxs = {}
        if any(FLOWS[f][1] == "text" for f in self.cfg.flows):
            ctxs["text"] = self.text_context(captions)
        if any(FLOWS[f][1] == "image" for f in self.cfg.flows):
            ctxs["image"] = self.image_context(to_pil(pixels))
        losses, total = {}, 0.0
        for f in self.cfg.flows:  # every flow's loss in one backward: gradients summed (Algorithm 1)
            out, ck = FLOWS[f]
            x0, ctx = data[out], ctxs[ck]
            drop = (torch.rand(ctx.shape[0]) < self.cfg.cond_dropout).to(ctx.device)
            if drop.any():
                ctx = torch.where(drop[:, None, None], self.uncond_context(ck, ctx.shape[0]).to(ctx.dtype), ctx)
            noise = torch.randn_like(x0)
            t = draw_timesteps(self.sched.config.num_train_timesteps, x0)
            pred = self.unet(self.sched.add_noise(x0, noise, t), t, out, ck, ctx)
            losses[f] = F.mse_loss(pred.float(), noise.float())
            total = total + losses[f]
        return {"loss": total, **{f"loss_{k}": v.detach() for k, v in losses.items()}}

    # -- inference -----------------------------------------------------------------------------------
    def _denoise(self, shape, seeds, steps, guidance, eps_cond, eps_uncond):
        return guided_sample(make_sampler(self.cfg.sampling.sampler, self.sched.config), steps, shape, seeds, self._dev(), guidance,
                             eps_cond, eps_uncond)

    def prompt_contexts(self, parts: list):
        """(image context or None, text context or None) of one prompt: images
        concatenated (multi-context) each scaled by ``image_scales``; PCA edit applied to
        image contexts."""
        from PIL import Image

        text = " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
        images = [p for p in parts if isinstance(p, Image.Image)]
        ictx = self.multi_context(images, self.cfg.image_scales or None) if images else None
        return ictx, (self.text_context([text]) if text else None)

    def multi_context(self, images, scales: list[float] | None = None) -> torch.Tensor:
        """A.3: several images' contexts concatenated along the tokens, each scaled."""
        scales = scales or [1.0] * len(images)
        if len(scales) != len(images):
            raise UserError(f"{len(scales)} image scale(s) for {len(images)} image(s)")
        ctxs = [disentangle(self.image_context([im]), self.cfg.pca) * s for im, s in zip(images, scales)]
        return torch.cat(ctxs, dim=1)

    @torch.no_grad()
    def generate(self, prompts: list[list], steps: int | None = None, guidance: float | None = None, seeds=None,
                 size: int | None = None):
        """Images: text only -> text-to-image; images only -> image variation (several:
        multi-context); text and images -> dual-context blending."""
        steps = self.cfg.sampling.steps if steps is None else steps
        guidance = self.cfg.sampling.guidance if guidance is None else guidance
        seeds = seeds or list(range(len(prompts)))
        image_unet = self.unet.data["image"]
        size = size or image_unet.config.sample_size * self.ae.downscale
        h = size // self.ae.downscale
        out = []
        for parts, seed in zip(prompts, seeds):
            ictx, tctx = self.prompt_contexts(parts)
            if ictx is None and tctx is None:
                tctx = self.text_context([""])
            if ictx is not None and tctx is not None:  # dual context; guidance against both unconditional contexts, blended
                ui, ut = self.uncond_context("image", 1), self.uncond_context("text", 1)
                cond = lambda x, t: self.unet.blend(x, t, "image", ictx, tctx, self.cfg.mix_rate, self.cfg.mixing)  # noqa: E731
                uncond = lambda x, t: self.unet.blend(x, t, "image", ui, ut, self.cfg.mix_rate, self.cfg.mixing)  # noqa: E731
            else:
                kind, ctx = ("image", ictx) if ictx is not None else ("text", tctx)
                u = self.uncond_context(kind, 1)
                cond = lambda x, t, kind=kind, ctx=ctx: self.unet(x, t, "image", kind, ctx)  # noqa: E731
                uncond = lambda x, t, kind=kind, u=u: self.unet(x, t, "image", kind, u)  # noqa: E731
            lat = self._denoise((image_unet.config.in_channels, h, h), [seed], steps, guidance, cond, uncond)
            out += to_pil(self.ae.decode(lat))
        return out

    @torch.no_grad()
    def generate_text(self, prompts: list[list], steps: int | None = None, guidance: float | None = None, seeds=None) -> list[str]:
        """Image-to-text (an image prompt) or text variation (a text prompt)."""
        steps = self.cfg.sampling.steps if steps is None else steps
        guidance = self.cfg.sampling.text_guidance if guidance is None else guidance
        if self.text_vae is None:
            raise UserError("model.text_vae is empty: text outputs need a text VAE")
        seeds = seeds or list(range(len(prompts)))
        text_unet = self.unet.data["text"]
        out = []
        for parts, seed in zip(prompts, seeds):
            ictx, tctx = self.prompt_contexts(parts)
            kind, ctx = ("image", ictx) if ictx is not None else ("text", tctx if tctx is not None else self.text_context([""]))
            u = self.uncond_context(kind, 1)
            z = self._denoise(text_latent_shape(text_unet), [seed], steps, guidance,
                              lambda x, t: self.unet(x, t, "text", kind, ctx), lambda x, t: self.unet(x, t, "text", kind, u))
            out += self.text_vae.decode(z.view(1, -1), self.cfg.text_max_length)
        return out


class Versatile(Family):
    name = "versatile"
    title = "Versatile Diffusion: one multi-flow diffuser for text-to-image, image variation, image-to-text, text variation"
    Config = Config
    demo = Demo(["versatile-tiny"], "tiny four-flow Versatile Diffusion (random-init image and text UNets, text VAE, CLIP)",
                note="dual-context blending (attention-level, mix rate 0.5)")
    text_outputs = True

    def build(self, cfg, train_cfg) -> VersatileModel:
        return VersatileModel(self.config(cfg))

    def param_groups(self, model: VersatileModel, cfg) -> list[dict]:
        """Table 1's layer groups, each at its own rate."""
        u = model.unet
        groups = {
            "global_layers": u.global_layers, "data_image": u.data["image"], "data_text": u.data["text"],
            "context_image": u.context["image"], "context_text": u.context["text"],
        }
        return lr_groups({k: [p for p in m.parameters() if p.requires_grad] for k, m in groups.items()}, model.cfg.lr)

    def generate_text(self, model: VersatileModel, prompts, steps=None, guidance=None, seeds=None) -> list[str]:
        return model.generate_text(prompts, steps, guidance, seeds)

    def demo_prompt(self, paths: list[str]) -> str:
        return f"a red circle <image:{paths[0]}>" if paths else "a red circle"

    def export(self, model: VersatileModel, out_dir: str) -> list[str]:
        """A ``VersatileDiffusionPipeline`` directory: the multi-flow UNet put back into the
        released layout (``MultiFlowUNet.flow``, the inverse of the load: each UNet gets its
        context type's cross-attention blocks and the shared global layers as its time
        embedding), the VAE, open_clip converted to transformers' CLIP text and vision
        models with their tokenizer and image processor (``mmloom/clip_convert.py``), the
        sampler mmloom samples with. The text VAE (Optimus) has no diffusers home: its
        trained heads stay in ``conditioning.safetensors``, its frozen encoder and decoder
        are named in ``conditioning.json``."""
        from diffusers import VersatileDiffusionPipeline

        from mmloom import clip_convert
        from ..export import export_parts, save_pipeline

        u, clip = model.unet, model.clip
        with u.flow("image", list(u.context["image"])) as image_unet, u.flow("text", list(u.context["text"])) as text_unet:
            pipe = VersatileDiffusionPipeline(
                tokenizer=clip_convert.tokenizer(clip), image_feature_extractor=clip_convert.image_processor(clip),
                text_encoder=clip_convert.text_model(clip), image_encoder=clip_convert.vision_model(clip),
                image_unet=image_unet, text_unet=text_unet, vae=model.ae.model,
                scheduler=make_sampler(model.cfg.sampling.sampler, model.sched.config))
            written = save_pipeline(pipe, out_dir)
        return written + export_parts(model, out_dir, exclude=("unet.", "ae."))

    def export_notes(self, model: VersatileModel) -> list[str]:
        return [
            "A `VersatileDiffusionPipeline` directory (`DiffusionPipeline.from_pretrained`): `image_unet` and `text_unet` in the "
            "released layout; each holds the shared global layers (time embedding) as its own copy.",
            "`text_encoder` / `image_encoder` are mmloom's open_clip model converted to transformers' CLIP; the tokenizer pads with "
            "open_clip's pad id 0 (`!`), as mmloom's contexts were made.",
            "diffusers' pipelines blend, guide and build their unconditional image context (a grey 512 px image) their own way; "
            "mmloom's (`model.image_uncond`, `mixing`, `mix_rate`) are in the training configuration below.",
            "No diffusers home: the text VAE (Optimus, image-to-text and text variation); its trained heads are in "
            "`conditioning.safetensors`, its frozen encoder and decoder named in `conditioning.json`.",
        ]


FAMILY = Versatile()
