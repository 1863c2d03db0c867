"""Versatile Diffusion (Xu et al., ICCV 2023; ARCHITECTURE.md, Papers): one multi-flow diffuser for text-to-image,
image variation, image-to-text and text variation.

Multi-flow UNet (sections 3.2, 3.3): layers fall in three groups. Global layers (the time
embedding) always run. Data layers belong to an output type: the image UNet's ResBlocks
for image latents, FCResBlocks (diffusers' flat UNet: fully connected residual blocks with
GroupNorm and SiLU) for text latents. Context layers belong to a context type: one set of
cross-attention blocks for CLIP text embeddings, one for CLIP image embeddings (global
vector + patch tokens, 257 x 768 for ViT-L/14). A flow (output, context) runs the global
layers, its output's data layers and its context's context layers only.

Training sums the losses, and so the gradients, of every flow before one update
(Algorithm 1), with per-group learning-rate multipliers (Table 1, four-flow: data image
0.2, data text 1.0, contexts 1.0, global 0.1). Text latents come from a text VAE of
Optimus's design (``train/text_vae.py``); image latents from AutoencoderKL; contexts are
CLIP's projected token embeddings divided by the norm of the global one (section 3.3).

Inference (appendices A, B): dual-context blending of one image and one text, mixing the
two context layers' outputs in every attention block (attention-level, ``mix_rate``) or
alternating them by layer (layer-level); multi-context from several images concatenated,
each scaled; style/semantic disentanglement by keeping (style) or removing (semantics)
the first principal components of the image patch tokens, the global vector untouched;
the unconditional image context is CLIP of an all-zero image or all-zero embeddings.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmloom.configbase import Section
from mmloom.errors import UserError
from mmloom.train.diffusion import Autoencoder, ScheduleConfig, ddpm, guided_sample, to_pil

FLOWS = {  # name -> (output data type, context type)
    "text_to_image": ("image", "text"),
    "image_variation": ("image", "image"),
    "image_to_text": ("text", "image"),
    "text_variation": ("text", "text"),
}


class Schedule(ScheduleConfig):
    beta_schedule: str = Field("linear", description="section 4.2: linear betas over 1000 steps (SD's 8.5e-4 to 1.2e-2)")


class Config(Section):
    image_unet: str = Field("shi-labs/versatile-diffusion", description="image data layers: diffusers UNet2DConditionModel (hub id or dir)")
    image_unet_subfolder: Optional[str] = Field("image_unet", description="subfolder of the image UNet")
    text_unet: str = Field("shi-labs/versatile-diffusion", description="text data layers: diffusers UNetFlatConditionModel (FCResBlocks)")
    text_unet_subfolder: Optional[str] = Field("text_unet", description="subfolder of the text UNet")
    vae: str = Field("shi-labs/versatile-diffusion", description="image VAE: diffusers AutoencoderKL")
    vae_subfolder: Optional[str] = Field("vae", description="subfolder of the VAE")
    text_vae: str = Field("", description="text VAE (Optimus design: BERT encoder, GPT-2 decoder) directory or hub repo; required for text flows")
    clip: str = Field("ViT-L-14/openai", description="open_clip model for both context encoders")
    flows: list[Literal["text_to_image", "image_variation", "image_to_text", "text_variation"]] = Field(
        default_factory=lambda: list(FLOWS), description="flows trained together (four-flow VD by default)")
    schedule: Schedule = Field(default_factory=Schedule, description="DDPM schedule")
    lr: float = Field(5e-5, gt=0, description="base learning rate (section 4.2: 1e-4 one/two flows, 5e-5 four flows)")
    lr_scale_data_image: float = Field(0.2, ge=0, description="Table 1: image data layers (0.1 for 1-2 flows)")
    lr_scale_data_text: float = Field(1.0, ge=0, description="Table 1: text data layers (FCResBlocks)")
    lr_scale_context_image: float = Field(1.0, ge=0, description="Table 1: image context layers")
    lr_scale_context_text: float = Field(1.0, ge=0, description="Table 1: text context layers")
    lr_scale_global: float = Field(0.1, ge=0, description="Table 1: global layers (time embedding)")
    context_dropout: float = Field(0.1, ge=0, le=1, description="context replaced by the unconditional one (classifier-free guidance)")
    image_uncond: Literal["zero_image", "zero_embedding"] = Field("zero_image", description="unconditional image context: CLIP of an all-zero image, or all-zero embeddings (B.1)")
    mixing: Literal["attention", "layer"] = Field("attention", description="dual-context blending: attention-level or layer-level mixing (A.2)")
    mix_rate: float = Field(0.5, ge=0, le=1, description="dual-context blending: weight of the text context (0 image only, 1 text only)")
    pca: int = Field(0, description="image variation: k > 0 keeps only the first k principal components (style), k < 0 removes the first -k (semantics)")
    image_scales: list[float] = Field(default_factory=list, description="multi-context (A.3): one scale per prompt image at sampling (empty: all 1)")
    text_max_length: int = Field(32, gt=0, description="image-to-text: longest sentence decoded")


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
        if image_unet.config.block_out_channels != text_unet.config.block_out_channels:
            raise UserError("the image and text UNets need the same block_out_channels (their context and global layers are shared)")
        self.context = nn.ModuleDict({
            "text": nn.ModuleList(image_unet.get_submodule(p) for p in self.paths),
            "image": nn.ModuleList(copy.deepcopy(image_unet.get_submodule(p)) for p in self.paths),
        })
        self.global_layers = image_unet.time_embedding
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
            text_at = {round(k * n / max(1, round(rate * n))) for k in range(round(rate * n))} if rate > 0 else set()
            layers = []
            for i in range(n):
                m = _WithContext(self.context["text" if i in text_at else "image"][i])
                m.ctx = text_ctx if i in text_at else image_ctx
                layers.append(m)
        with self.flow(output, layers) as unet:
            return unet(x, t, encoder_hidden_states=text_ctx).sample


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
        basis = v[: min(abs(k), v.shape[0])]  # [k, D]
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
        from mmloom.train.text_vae import TextVAE
        from mmloom.train.tiny import resolve_tiny

        self.cfg = cfg
        if not cfg.flows:
            raise UserError("model.flows is empty: name at least one of " + ", ".join(FLOWS))
        sub = lambda s: {"subfolder": s} if s else {}  # noqa: E731
        image_unet = hf_pretrained(UNet2DConditionModel, resolve_tiny(cfg.image_unet), "image UNet", **sub(cfg.image_unet_subfolder))
        text_unet = hf_pretrained(UNetFlatConditionModel, resolve_tiny(cfg.text_unet), "text UNet", **sub(cfg.text_unet_subfolder))
        self.unet = MultiFlowUNet(image_unet, text_unet)
        self.ae = Autoencoder(cfg.vae, cfg.vae_subfolder, "kl")
        self.clip = ClipEmbedder(resolve_tiny(cfg.clip))
        self._uncond: dict[str, torch.Tensor] = {}  # kind -> CLIP of the empty text / the all-zero image
        needs_text = any(FLOWS[f][0] == "text" for f in cfg.flows)
        if needs_text and not cfg.text_vae:
            raise UserError("model.text_vae is empty: the image_to_text and text_variation flows need a text VAE")
        self.text_vae = TextVAE.load(resolve_tiny(cfg.text_vae)) if cfg.text_vae else None
        if self.text_vae is not None:
            self.text_vae.requires_grad_(False)
            if self.text_vae.latent_dim != text_unet.config.in_channels * 4:
                raise UserError(f"the text VAE's {self.text_vae.latent_dim}-d latents do not fit the text UNet "
                                f"(in_channels {text_unet.config.in_channels} x 4)")
        if image_unet.config.cross_attention_dim != self.clip.dim:
            raise UserError(f"the UNets' cross_attention_dim ({image_unet.config.cross_attention_dim}) must equal the CLIP "
                            f"embedding width ({self.clip.dim}) of model.clip")
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
        t = self.clip.tokenizer([s or "" for s in texts])
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
        all-zero image or all-zero embeddings. CLIP is frozen, so each is encoded once."""
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
        return z.view(z.shape[0], -1, 4, 1)

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
            drop = (torch.rand(ctx.shape[0]) < self.cfg.context_dropout).to(ctx.device)
            if drop.any():
                ctx = torch.where(drop[:, None, None], self.uncond_context(ck, ctx.shape[0]).to(ctx.dtype), ctx)
            noise = torch.randn_like(x0)
            t = torch.randint(0, self.sched.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
            pred = self.unet(self.sched.add_noise(x0, noise, t), t, out, ck, ctx)
            losses[f] = F.mse_loss(pred.float(), noise.float())
            total = total + losses[f]
        return {"loss": total, **{f"loss_{k}": v.detach() for k, v in losses.items()}}

    # -- inference -----------------------------------------------------------------------------------
    def _denoise(self, shape, seeds, steps, guidance, eps_cond, eps_uncond):
        from diffusers import DDIMScheduler

        return guided_sample(DDIMScheduler.from_config(self.sched.config), steps, shape, seeds, self._dev(), guidance,
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
    def generate(self, prompts: list[list], steps: int = 50, guidance: float = 7.5, seeds=None, size: int | None = None):
        """Images: text only -> text-to-image; images only -> image variation (several:
        multi-context); text and images -> dual-context blending."""
        seeds = seeds or list(range(len(prompts)))
        image_unet = self.unet.data["image"]
        size = size or image_unet.config.sample_size * self.ae.downscale
        h = size // self.ae.downscale
        out = []
        for parts, seed in zip(prompts, seeds):
            ictx, tctx = self.prompt_contexts(parts)
            if ictx is None and tctx is None:
                tctx = self.text_context([""])
            if ictx is not None and tctx is not None:  # dual context; guidance against the empty text
                kind = "text"
                cond = lambda x, t: self.unet.blend(x, t, "image", ictx, tctx, self.cfg.mix_rate, self.cfg.mixing)  # noqa: E731
            else:
                kind, ctx = ("image", ictx) if ictx is not None else ("text", tctx)
                cond = lambda x, t, kind=kind, ctx=ctx: self.unet(x, t, "image", kind, ctx)  # noqa: E731
            u = self.uncond_context(kind, 1)
            uncond = lambda x, t, kind=kind, u=u: self.unet(x, t, "image", kind, u)  # noqa: E731
            lat = self._denoise((image_unet.config.in_channels, h, h), [seed], steps, guidance, cond, uncond)
            out += to_pil(self.ae.decode(lat))
        return out

    @torch.no_grad()
    def generate_text(self, prompts: list[list], steps: int = 50, guidance: float = 2.0, seeds=None) -> list[str]:
        """Image-to-text (an image prompt) or text variation (a text prompt)."""
        if self.text_vae is None:
            raise UserError("model.text_vae is empty: text outputs need a text VAE")
        seeds = seeds or list(range(len(prompts)))
        text_unet = self.unet.data["text"]
        out = []
        for parts, seed in zip(prompts, seeds):
            ictx, tctx = self.prompt_contexts(parts)
            kind, ctx = ("image", ictx) if ictx is not None else ("text", tctx if tctx is not None else self.text_context([""]))
            u = self.uncond_context(kind, 1)
            z = self._denoise((text_unet.config.in_channels, 4, 1), [seed], steps, guidance,
                              lambda x, t: self.unet(x, t, "text", kind, ctx), lambda x, t: self.unet(x, t, "text", kind, u))
            out += self.text_vae.decode(z.view(1, -1), self.cfg.text_max_length)
        return out


def build(model_cfg: dict, train_cfg) -> VersatileModel:
    from mmloom.configbase import load_model

    return VersatileModel(load_model(Config, data=model_cfg, source="model"))


def param_groups(model: VersatileModel, model_cfg: dict) -> list[dict]:
    """Table 1's layer groups, each at lr x its multiplier."""
    c = model.cfg
    u = model.unet
    groups = {
        "global": (list(u.global_layers.parameters()), c.lr_scale_global),
        "data_image": (list(u.data["image"].parameters()), c.lr_scale_data_image),
        "data_text": (list(u.data["text"].parameters()), c.lr_scale_data_text),
        "context_image": (list(u.context["image"].parameters()), c.lr_scale_context_image),
        "context_text": (list(u.context["text"].parameters()), c.lr_scale_context_text),
    }
    return [{"name": k, "params": [p for p in ps if p.requires_grad], "lr": c.lr * s}
            for k, (ps, s) in groups.items() if ps and s > 0]


def generate(model: VersatileModel, prompts, steps=50, guidance=7.5, seeds=None, size=None):
    return model.generate(prompts, steps, guidance, seeds, size)


def generate_text(model: VersatileModel, prompts, steps=50, guidance=2.0, seeds=None) -> list[str]:
    return model.generate_text(prompts, steps, guidance, seeds)
