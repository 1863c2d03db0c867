"""Kandinsky (Kandinsky: an Improved Text-to-Image Synthesis with Image Prior and Latent
Diffusion): an image prior and a latent-diffusion decoder, trained apart.

* ``stage: prior`` (section 4, Table 3) maps CLIP text embeddings to CLIP image
  embeddings. Four priors: ``linear`` (one linear layer, the best FID in Table 3),
  ``residual`` (18 residual MLP blocks), ``diffusion`` (mmloom's transformer encoder over
  the text tokens, the pooled text embedding, the timestep, the noised image embedding and
  a learned query, predicting x0; 20 layers, 32 heads, width 2048 in the paper) and
  ``released``: diffusers' ``PriorTransformer`` in the layout of the released
  ``kandinsky-community/kandinsky-2-1-prior`` (``prior/``: the same inputs, a causal
  transformer, 20 layers, 32 heads of 64, width 2048, 768-d CLIP ViT-L/14; ``scheduler/``:
  its UnCLIPScheduler, cosine betas, x0 prediction, fixed_small_log variance, x0 clipped
  to [-10, 10]), loaded through mmloom/models.py (strict: a renamed key stops the load),
  trained and sampled as diffusers' KandinskyPriorPipeline samples it. The image
  embeddings a prior learns are normalized element-wise and denormalized at inference.

Normalization: the paper (section 4) normalizes each element of the image embedding with
statistics over the whole training dataset. The released pipeline keeps them in the
prior as ``prior.clip_mean`` / ``prior.clip_std`` ([1, D] parameters, never trained) and
applies only the inverse, ``post_process_latents`` (x * clip_std + clip_mean), to what it
samples. mmloom's ``released`` prior keeps its statistics there too: training normalizes
its target with (x - clip_mean) / clip_std and sampling denormalizes with diffusers' own
``post_process_latents``. ``prior_stats: dataset`` (the paper) writes the statistics of
the selected samples into them before the first step; ``checkpoint`` keeps the released
ones (fine-tuning the released prior in the space it was trained in). The other priors
keep theirs in a ``Normalizer`` (``norm.mean`` / ``norm.std``). Scale: every CLIP
embedding this family uses is at CLIP's own scale, as the released prior and decoder were
trained (transformers' unnormalized ``text_embeds`` / ``image_embeds``): the pooled text
embedding, the image embeddings computed here, the black image's, and the stored ones
(the score stage keeps a unit vector for cosine search and its length,
``clip_image_norm``; build writes their product into ``KEY.clip_image.npy``, and the
dataset statistics are over the same products). So a released prior or decoder sees
embeddings at its training scale, and an exported ``KandinskyPriorPipeline`` reproduces
the run (tests/test_export.py). A dataset scored before the norm was stored has unit
vectors in its shards: rescore it for CLIP's scale. Token states are open_clip's after
ln_final, as transformers' ``last_hidden_state``.
* ``stage: decoder``: a diffusers UNet in the released Kandinsky 2.1 layout conditioned
  on the CLIP image embedding (projected into 10 context tokens next to the text tokens,
  and added to the time embedding with the pooled text embedding) and on the text through
  the multilingual encoder the paper uses (section 4: "XLMR-CLIP", diffusers'
  MultilingualCLIP: XLM-RoBERTa-Large, its tokens as context, a linear map of their mean
  as the pooled embedding); latents from a VQ (MoVQ) or KL autoencoder. The
  unconditional input is the CLIP embedding of a black image (and empty text). The UNet
  predicts epsilon and a variance (8 channels, learned variance as the released weights):
  the loss is the mean squared error of the epsilon half only (the paper does not give
  its objective; the diffusers decoder training recipe does the same, and the released
  variance channels are kept, untrained); at sampling, guidance acts on epsilon and the
  conditional variance goes to a scheduler that uses one (``ddpm``: learned_range, as
  diffusers' KandinskyPipeline does), DDIM and PNDM drop it. As the released pipeline,
  the UNet attends to every text position (no padding mask).

Image embeddings are normalized (prior) with statistics over the samples the dataset
selected (train/embed_stats.py), not over every scored image.

Inference (generate): a prompt's text goes through the prior (``prior_checkpoint``: a
trained prior run), its images through the CLIP image tower; several embeddings are
fused by interpolation (image fusion, text-and-image fusion); one image alone gives
variations. Without a prior, text embeddings stand in for image embeddings (Table 3's
"no prior" row). The CLIP model must be the one the score stage stored embeddings with.
The paper does not say how embeddings are fused; the released pipeline's ``interpolate``
sums the weighted embeddings as given. mmloom scales the weights to sum 1 and rescales
the mix to the weights' mean norm (:func:`interpolate`): a plain mix of embeddings that
point apart is shorter than any of them (two orthogonal unit vectors: 0.71), and the
decoder has only seen embeddings of CLIP's own norms.

Sampling: the paper picks its guidance scale from FID-CLIP curves (section 5, Figure 4)
without stating it, nor the sampler or step counts. mmloom uses the released Kandinsky
2.1 pipelines' settings (diffusers' KandinskyPipeline and KandinskyPriorPipeline):
decoder DDIM, 100 steps, guidance 4; diffusion prior 25 steps (``diffusion``: DDIM;
``released``: the checkpoint's UnCLIPScheduler, as the released pipeline), guidance 4.
"""

from __future__ import annotations

import posixpath
from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmloom.errors import UserError
from ..diffusion import Autoencoder, ScheduleConfig, ddpm, draw_timesteps, load_unet, start_noise, to_pil
from .base import (AutoencoderConfig, ClipEncoderConfig, Demo, Family, GuidedConfig, LearningRates,
                                        Pretrained, SamplingDefaults, lr_groups, make_sampler, part)


class PriorSchedule(ScheduleConfig):
    beta_schedule: str = Field("squaredcos_cap_v2", description="prior's beta schedule (cosine)")


class DecoderSchedule(ScheduleConfig):
    beta_schedule: str = Field("linear", description="decoder's beta schedule (Kandinsky 2.1: linear 0.00085 to 0.012)")


class TextEncoderConfig(Pretrained):
    tokenizer_subfolder: Optional[str] = Field(None, description="subfolder of `path` holding the tokenizer (null: `path` itself)")


class LR(LearningRates):
    prior: float = Field(1e-4, ge=0, description="stage prior: the image prior")
    unet: float = Field(1e-4, ge=0, description="stage decoder: the decoder UNet")


class Sampling(SamplingDefaults):
    sampler: Literal["ddim", "pndm", "ddpm"] = Field("ddim", description="decoder sampler (the paper states none: DDIM, as the released "
                                                    "pipeline; ddpm uses the learned variance, learned_range)")
    steps: int = Field(100, gt=0, description="decoder steps (the released pipeline's 100)")
    guidance: float = Field(4.0, ge=0, description="decoder guidance (section 5 picks it from FID-CLIP curves, unstated: the released pipeline's 4)")
    prior_steps: int = Field(25, gt=0, description="diffusion prior: DDIM steps (the released prior pipeline's 25)")
    prior_guidance: float = Field(4.0, ge=0, description="diffusion prior: classifier-free guidance (the released prior pipeline's 4)")


class Config(GuidedConfig):
    RENAMED: ClassVar[dict[str, str]] = {
        "clip": "encoder.path", "text_dropout": "cond_dropout", "image_dropout": "cond_dropout",
        "prior_guidance": "sampling.prior_guidance", "prior_steps": "sampling.prior_steps",
    }

    stage: Literal["prior", "decoder"] = Field("prior", description="train the image prior or the decoder (two runs)")
    encoder: ClipEncoderConfig = part(ClipEncoderConfig, "CLIP (open_clip): the score stage's, whose embeddings are stored",
                                      path="ViT-L-14/openai")
    prior: Literal["linear", "residual", "diffusion", "released"] = Field(
        "diffusion", description="prior architecture (Table 3; released: diffusers PriorTransformer in the released Kandinsky 2.1 "
        "prior's layout, from model.prior_model)")
    prior_model: Pretrained = part(Pretrained, "prior released: diffusers PriorTransformer (its clip_mean/clip_std hold the "
                                   "normalization); its UnCLIPScheduler is read from the `scheduler` folder next to it",
                                   path="kandinsky-community/kandinsky-2-1-prior", subfolder="prior")
    prior_stats: Literal["dataset", "checkpoint"] = Field(
        "dataset", description="prior released: normalization statistics; dataset: the selected samples' (the paper), written "
        "into prior.clip_mean/clip_std; checkpoint: the checkpoint's clip_mean/clip_std kept (fine-tuning the released prior)")
    prior_layers: int = Field(20, gt=0, description="diffusion prior: transformer layers (section 4: 20)")
    prior_heads: int = Field(32, gt=0, description="diffusion prior: attention heads (section 4: 32)")
    prior_width: int = Field(2048, gt=0, description="diffusion prior: hidden size (section 4: 2048)")
    residual_blocks: int = Field(18, gt=0, description="residual prior: residual MLP blocks (section 5: 18)")
    prior_schedule: PriorSchedule = Field(default_factory=PriorSchedule, description="diffusion prior's noise schedule")
    backbone: Pretrained = part(Pretrained, "decoder: diffusers UNet2DConditionModel with text_image_proj",
                                path="kandinsky-community/kandinsky-2-1", subfolder="unet")
    text_encoder: TextEncoderConfig = part(TextEncoderConfig, "decoder: the multilingual text encoder (diffusers MultilingualCLIP, XLM-R) and its tokenizer",
                                           path="kandinsky-community/kandinsky-2-1", subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    autoencoder: AutoencoderConfig = part(AutoencoderConfig, "decoder: diffusers autoencoder (MoVQ)",
                                          path="kandinsky-community/kandinsky-2-1", subfolder="movq", type="vq")
    schedule: DecoderSchedule = Field(default_factory=DecoderSchedule, description="decoder's DDPM schedule")
    cond_dropout: float = Field(0.1, ge=0, le=1, description="classifier-free guidance: prior, the caption dropped (empty text); "
                                "decoder, the conditioning replaced by the black-image embedding and empty text")
    use_stored_embeddings: bool = Field(True, description="decoder: condition on the stored image embeddings (false: embed each training image)")
    lr: LR = Field(default_factory=LR, description="learning rate per parameter group (one per stage)")
    prior_checkpoint: Optional[str] = Field(None, description="decoder sampling: a trained prior run or checkpoint for text prompts")
    text_weight: float = Field(0.5, ge=0, le=1, description="text-and-image fusion: weight of the text's embedding (images share the rest)")
    sampling: Sampling = Field(default_factory=Sampling, description="sampling defaults (the released Kandinsky 2.1 pipelines')")


class Normalizer(nn.Module):
    """Element-wise (x - mean) / std with full-dataset statistics kept in the checkpoint."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def fit(self, mean, std, count: int):
        self.mean.copy_(torch.as_tensor(mean))
        self.std.copy_(torch.as_tensor(std).clamp(min=1e-6))
        self.count.fill_(count)

    def forward(self, x):
        return (x - self.mean) / self.std

    def inverse(self, x):
        return x * self.std + self.mean


class PriorStats(nn.Module):
    """The ``released`` prior's normalization, kept where the released layout keeps it: its
    ``clip_mean`` / ``clip_std`` ([1, D] parameters of diffusers' PriorTransformer, frozen).
    The inverse is diffusers' own ``post_process_latents``, what the released pipeline
    applies to its samples. ``mean`` / ``std`` buffers mirror them so that a checkpoint holds
    the statistics (the prior's frozen tensors are rebuilt from its source, not saved);
    loading a checkpoint writes them back into the prior."""

    def __init__(self, prior: nn.Module, from_checkpoint: bool):
        super().__init__()
        object.__setattr__(self, "_prior", prior)  # not a submodule: the prior's weights are saved once, under prior.
        prior.clip_mean.requires_grad_(False)
        prior.clip_std.requires_grad_(False)
        self.register_buffer("mean", prior.clip_mean.detach()[0].clone())
        self.register_buffer("std", prior.clip_std.detach()[0].clone())
        # count: samples the statistics are over (-1: the checkpoint's own, 0: not fitted yet)
        self.register_buffer("count", torch.full((), -1 if from_checkpoint else 0, dtype=torch.long))
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync())

    def _sync(self):
        with torch.no_grad():
            self._prior.clip_mean.copy_(self.mean[None])
            self._prior.clip_std.copy_(self.std[None])

    def fit(self, mean, std, count: int):
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype).clamp(min=1e-6))
        self.count.fill_(count)
        self._sync()

    def forward(self, x):
        return (x - self._prior.clip_mean) / self._prior.clip_std

    def inverse(self, x):
        return self._prior.post_process_latents(x)


class LinearPrior(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens, mask, pooled):
        return self.proj(pooled)


class ResidualPrior(nn.Module):
    def __init__(self, dim: int, blocks: int, width: int):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def forward(self, tokens, mask, pooled):
        h = self.inp(pooled)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class DiffusionPrior(nn.Module):
    """Transformer encoder over [text tokens, pooled text, time, noised image emb, query];
    the query's output is the predicted (normalized) image embedding x0. Its layers are
    pre-norm (GELU, a 4x MLP, no dropout): the paper gives the prior's size (section 4),
    not its block, and this is the usual block that trains stably from scratch."""

    def __init__(self, dim: int, text_width: int, width: int, layers: int, heads: int):
        super().__init__()
        if width % heads:
            raise UserError(f"model.prior_heads ({heads}) must divide model.prior_width ({width})")
        self.width = width
        self.text_in = nn.Linear(text_width, width)
        self.pooled_in = nn.Linear(dim, width)
        self.image_in = nn.Linear(dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, tokens, mask, pooled, noised, t):
        from diffusers.models.embeddings import get_timestep_embedding

        B = pooled.shape[0]
        time = get_timestep_embedding(t, self.width, flip_sin_to_cos=True, downscale_freq_shift=0)  # sinusoids, cosines first
        seq = torch.cat([self.text_in(tokens), self.pooled_in(pooled)[:, None], self.time_mlp(time)[:, None],
                         self.image_in(noised)[:, None], self.query.expand(B, -1, -1)], dim=1)
        keep = torch.cat([mask.bool(), torch.ones(B, 4, dtype=torch.bool, device=mask.device)], dim=1)
        h = self.norm(self.blocks(seq, src_key_padding_mask=~keep))
        return self.out(h[:, -1])


class KandinskyModel(nn.Module):
    def __init__(self, cfg: Config, data_spec: str, allow_pipe: bool):  # no defaults: `pipe:` only as data.allow_pipe says
        super().__init__()
        from mmloom.clip import ClipEmbedder
        from ...testkit.tiny_train import resolve_tiny

        self.cfg, self.data_spec, self.allow_pipe = cfg, data_spec, allow_pipe
        self.clip = ClipEmbedder(resolve_tiny(cfg.encoder.path))  # frozen; not an nn.Module, not in checkpoints
        self.dim = self.clip.dim
        self.text_width = int(self.clip.model.ln_final.normalized_shape[0])
        self._prior_model = None
        if cfg.stage == "prior" and cfg.prior == "released":
            self._released_prior(cfg)
        elif cfg.stage == "prior":
            self.norm = Normalizer(self.dim)
            if cfg.prior == "linear":
                self.prior = LinearPrior(self.dim)
            elif cfg.prior == "residual":
                self.prior = ResidualPrior(self.dim, cfg.residual_blocks, cfg.prior_width)
            else:
                self.prior = DiffusionPrior(self.dim, self.text_width, cfg.prior_width, cfg.prior_layers, cfg.prior_heads)
            self.prior_sched = ddpm(cfg.prior_schedule, prediction_type="sample")
        else:
            from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP
            from transformers import AutoTokenizer

            from mmloom.models import hf_pretrained

            self.unet = load_unet(cfg.backbone.path, cfg.backbone.subfolder)
            te = cfg.text_encoder
            sub = lambda s: {"subfolder": s} if s else {}  # noqa: E731
            # not strict: a transformers checkpoint may carry keys the class ignores (position ids)
            self.text_encoder = hf_pretrained(MultilingualCLIP, resolve_tiny(te.path), "text encoder", **sub(te.subfolder)).eval()
            self.text_encoder.requires_grad_(False)
            self.tokenizer = hf_pretrained(AutoTokenizer, resolve_tiny(te.path), "tokenizer", **sub(te.tokenizer_subfolder))
            uc, tc = self.unet.config, self.text_encoder.config
            if uc.encoder_hid_dim_type != "text_image_proj" or uc.addition_embed_type != "text_image":
                raise UserError(f"model.backbone.path {cfg.backbone.path}: a Kandinsky decoder needs encoder_hid_dim_type 'text_image_proj' and "
                                f"addition_embed_type 'text_image' (Kandinsky 2.1's UNet)")
            if uc.cross_attention_dim != self.dim or uc.encoder_hid_dim != tc.transformerDimensions or tc.numDims != self.dim:
                raise UserError(f"model.backbone.path {cfg.backbone.path} expects {uc.cross_attention_dim}-d image embeddings and "
                                f"{uc.encoder_hid_dim}-d text tokens; model.encoder.path {cfg.encoder.path} gives {self.dim}-d and "
                                f"model.text_encoder.path {te.path} {tc.transformerDimensions}-d tokens, {tc.numDims}-d pooled")
            if uc.out_channels not in (uc.in_channels, 2 * uc.in_channels):
                raise UserError(f"model.backbone.path {cfg.backbone.path}: out_channels {uc.out_channels} is neither in_channels "
                                f"({uc.in_channels}, epsilon) nor twice that (epsilon and learned variance)")
            self.ae = Autoencoder(cfg.autoencoder.path, cfg.autoencoder.subfolder, cfg.autoencoder.type)
            self.sched = ddpm(cfg.schedule)
            from PIL import Image

            self.register_buffer("black", self.clip.images([Image.new("RGB", (224, 224))], normalize=False)[0], persistent=False)

    def _released_prior(self, cfg: Config):
        """diffusers' PriorTransformer and UnCLIPScheduler from the released layout."""
        from diffusers import PriorTransformer, UnCLIPScheduler

        from mmloom.models import hf_pretrained

        from ...testkit.tiny_train import resolve_tiny

        pm = cfg.prior_model
        ref = resolve_tiny(pm.path)
        self.prior = hf_pretrained(PriorTransformer, ref, "model.prior_model", strict=True, **({"subfolder": pm.subfolder} if pm.subfolder else {}))
        sched_sub = posixpath.join(posixpath.dirname((pm.subfolder or "").strip("/")), "scheduler")  # prior/ -> scheduler/
        self.prior_sched = hf_pretrained(UnCLIPScheduler, ref, "model.prior_model's scheduler", subfolder=sched_sub)
        pc = self.prior.config
        ctx = int(self.clip.model.positional_embedding.shape[0])
        if pc.embedding_dim != self.dim or self.text_width != pc.embedding_dim or pc.num_embeddings != ctx:
            raise UserError(f"model.prior_model {pm.path}: the prior takes {pc.embedding_dim}-d embeddings and {pc.num_embeddings} "
                            f"{pc.embedding_dim}-wide text tokens; model.encoder.path {cfg.encoder.path} gives {self.dim}-d embeddings "
                            f"and {ctx} {self.text_width}-wide tokens (the released prior's is ViT-L-14/openai)")
        self.norm = PriorStats(self.prior, cfg.prior_stats == "checkpoint")
        if cfg.prior_stats == "checkpoint" and not bool((self.prior.clip_std > 0).all()):
            raise UserError(f"model.prior_model {pm.path}: its clip_std is not all positive (an unfitted prior's is "
                            "zeros): set model.prior_stats: dataset")

    def _run_prior(self, noised, t, tokens, mask, pooled):
        """The image embedding (normalized, x0) the prior predicts from a noised one."""
        if self.cfg.prior == "released":
            return self.prior(noised, timestep=t, proj_embedding=pooled, encoder_hidden_states=tokens,
                              attention_mask=mask.bool()).predicted_image_embedding
        return self.prior(tokens, mask, pooled, noised, t)

    # -- shared -------------------------------------------------------------------------
    def text(self, texts: list[str]):
        states, mask, pooled = self.clip.text_states(texts, normalize=False)
        dev = self._device()
        return states.to(dev), mask.to(dev), pooled.to(dev)

    def _device(self):
        return next(self.parameters()).device

    def fit_normalizer(self):
        """Full-dataset statistics of the stored embeddings (once, before the first step)."""
        from ..embed_stats import embedding_stats

        if not self.data_spec:
            raise UserError("data.shards is empty: the prior's normalization needs the dataset's stored embeddings")
        mean, std, n = embedding_stats(self.data_spec, self.allow_pipe)
        if mean.shape[0] != self.dim:
            raise UserError(f"the stored embeddings are {mean.shape[0]}-d but model.encoder.path {self.cfg.encoder.path} gives {self.dim}-d")
        self.norm.fit(mean, std, n)

    def _image_embeddings(self, batch: dict) -> torch.Tensor:
        if self.cfg.use_stored_embeddings or self.cfg.stage == "prior":
            if batch.get("clip_image") is None:
                raise UserError("the final shards hold no stored CLIP image embeddings (KEY.clip_image.npy): run the score stage "
                                "with score.clip.store_embeddings and build again" + ("" if self.cfg.stage == "prior" else
                                                                                     ", or set model.use_stored_embeddings: false"))
            emb = batch["clip_image"].float()
        else:
            emb = self.clip.images(to_pil(batch["pixels"]), normalize=False)
        if emb.shape[-1] != self.dim:
            raise UserError(f"stored image embeddings are {emb.shape[-1]}-d, model.encoder.path {self.cfg.encoder.path} gives {self.dim}-d: "
                            "use the score stage's CLIP")
        return emb.to(self._device())

    # -- training ---------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        return self._prior_loss(batch) if self.cfg.stage == "prior" else self._decoder_loss(batch)

    def _prior_loss(self, batch: dict) -> dict:
        if int(self.norm.count) == 0:
            self.fit_normalizer()
        x0 = self.norm(self._image_embeddings(batch))
        drop = torch.rand(len(batch["captions"])) < self.cfg.cond_dropout
        tokens, mask, pooled = self.text(["" if d else c for c, d in zip(batch["captions"], drop.tolist())])
        if self.cfg.prior in ("diffusion", "released"):
            t = draw_timesteps(self.prior_sched.config.num_train_timesteps, x0)
            noised = self.prior_sched.add_noise(x0, torch.randn_like(x0), t)
            pred = self._run_prior(noised, t, tokens, mask, pooled)
        else:
            pred = self.prior(tokens, mask, pooled)
        return {"loss": F.mse_loss(pred, x0)}

    @torch.no_grad()
    def decoder_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, D], tokens [B, 77, W]) of the multilingual text encoder, as the
        released pipeline tokenizes (77 positions, padded)."""
        t = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        dev = self._device()
        pooled, tokens = self.text_encoder(input_ids=t.input_ids.to(dev), attention_mask=t.attention_mask.to(dev))
        return pooled, tokens

    def _condition(self, texts: list[str], image_emb: torch.Tensor):
        pooled, tokens = self.decoder_text(texts)
        return dict(encoder_hidden_states=tokens, added_cond_kwargs={"text_embeds": pooled, "image_embeds": image_emb})

    def _eps(self, out: torch.Tensor) -> torch.Tensor:
        """The epsilon half of the UNet's output (all of it without learned variance)."""
        return out[:, : self.unet.config.in_channels]

    def _decoder_loss(self, batch: dict) -> dict:
        pixels = batch["pixels"].to(self._device())
        img = self._image_embeddings(batch)
        drop = (torch.rand(img.shape[0]) < self.cfg.cond_dropout).to(img.device)
        img = torch.where(drop[:, None], self.black.expand_as(img), img)
        texts = ["" if d else c for c, d in zip(batch["captions"], drop.tolist())]
        latents = self.ae.encode(pixels)
        noise = torch.randn_like(latents)
        t = draw_timesteps(self.sched.config.num_train_timesteps, latents)
        pred = self._eps(self.unet(self.sched.add_noise(latents, noise, t), t, **self._condition(texts, img)).sample)
        return {"loss": F.mse_loss(pred.float(), noise.float())}

    # -- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def prior_embed(self, texts: list[str], guidance: float | None = None, steps: int | None = None, seed: int = 0) -> torch.Tensor:
        """CLIP text -> CLIP image embeddings (denormalized) with this prior."""
        tokens, mask, pooled = self.text(texts)
        if self.cfg.prior not in ("diffusion", "released"):
            return self.norm.inverse(self.prior(tokens, mask, pooled))
        g = guidance if guidance is not None else self.cfg.sampling.prior_guidance
        if self.cfg.prior == "released":
            return self._released_prior_embed(tokens, mask, pooled, g, steps or self.cfg.sampling.prior_steps, seed)
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.prior_sched.config)
        sched.set_timesteps(steps or self.cfg.sampling.prior_steps)
        utok, umask, upool = self.text([""] * len(texts))
        x = torch.randn((len(texts), self.dim), generator=torch.Generator().manual_seed(seed)).to(pooled.device)
        for t in sched.timesteps:
            tt = torch.full((len(texts),), int(t), device=x.device)
            c = self.prior(tokens, mask, pooled, x, tt)
            u = self.prior(utok, umask, upool, x, tt)
            x = sched.step(u + g * (c - u), t, x).prev_sample
        return self.norm.inverse(x)

    def _released_prior_embed(self, tokens, mask, pooled, guidance: float, steps: int, seed: int) -> torch.Tensor:
        """As diffusers' KandinskyPriorPipeline: the checkpoint's UnCLIPScheduler, one
        generator for the start noise and every step's variance noise, guidance on x0,
        then ``post_process_latents`` (the released denormalization)."""
        from diffusers import UnCLIPScheduler

        B = pooled.shape[0]
        utok, umask, upool = self.text([""] * B)
        sched = UnCLIPScheduler.from_config(self.prior_sched.config)
        sched.set_timesteps(steps, device=pooled.device)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((B, self.dim), generator=gen).to(pooled.device) * sched.init_noise_sigma
        ts = sched.timesteps
        for i, t in enumerate(ts):
            both = self._run_prior(torch.cat([x, x]), t, torch.cat([utok, tokens]), torch.cat([umask, mask]), torch.cat([upool, pooled]))
            u, c = both.chunk(2)
            x = sched.step(u + guidance * (c - u), timestep=t, sample=x, generator=gen,
                           prev_timestep=None if i + 1 == len(ts) else ts[i + 1]).prev_sample
        return self.norm.inverse(x)  # post_process_latents, the released denormalization

    def _load_prior(self):
        if self._prior_model is None and self.cfg.prior_checkpoint:
            from ..sample import load_for_sampling

            _fam, model, cfg = load_for_sampling(self.cfg.prior_checkpoint)
            if cfg.family != "kandinsky" or model.cfg.stage != "prior":
                raise UserError(f"model.prior_checkpoint {self.cfg.prior_checkpoint} is not a Kandinsky prior run")
            self._prior_model = model.to(self._device())
        return self._prior_model

    def embed_prompt(self, parts: list, seed: int = 0) -> tuple[torch.Tensor, str]:
        """One prompt -> (image embedding, decoder text): text through the prior, images
        through CLIP; several are fused by interpolation (text gets ``text_weight``)."""
        from PIL import Image

        text = " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
        images = [p for p in parts if isinstance(p, Image.Image)]
        embs, weights = [], []
        if text:
            prior = self._load_prior()
            e = prior.prior_embed([text], seed=seed) if prior is not None else self.clip.texts([text], normalize=False).to(self._device())
            embs.append(e[0])
            weights.append(self.cfg.text_weight if images else 1.0)
        if images:
            ie = self.clip.images(images, normalize=False).to(self._device())
            for e in ie:
                embs.append(e)
                weights.append((1.0 - (self.cfg.text_weight if text else 0.0)) / len(images))
        if not embs:
            return self.black, ""
        return interpolate(embs, weights), text

    @torch.no_grad()
    def generate(self, prompts: list[list], steps: int | None = None, guidance: float | None = None, seeds=None,
                 size: int | None = None):
        if self.cfg.stage == "prior":
            raise UserError("a Kandinsky prior makes embeddings, not pictures: sample from a decoder run whose "
                            "model.prior_checkpoint names this prior")
        sampling = self.cfg.sampling
        steps = sampling.steps if steps is None else steps
        guidance = sampling.guidance if guidance is None else guidance
        seeds = seeds or list(range(len(prompts)))
        size = size or self.unet.config.sample_size * self.ae.downscale
        conds = [self.embed_prompt(p, s) for p, s in zip(prompts, seeds)]
        img = torch.stack([c[0] for c in conds])
        cond = self._condition([c[1] for c in conds], img)
        uncond = self._condition([""] * len(prompts), self.black.expand_as(img))
        h = size // self.ae.downscale
        return to_pil(self.ae.decode(self._sample((self.unet.config.in_channels, h, h), seeds, steps, guidance, cond, uncond)))

    def _sampler(self, name: str):
        if name == "ddpm":
            from diffusers import DDPMScheduler

            return DDPMScheduler.from_config(self.sched.config, variance_type="learned_range")
        return make_sampler(name, self.sched.config)

    def _sample(self, shape, seeds, steps: int, guidance: float, cond: dict, uncond: dict) -> torch.Tensor:
        """Guided sampling as diffusers' KandinskyPipeline: guidance on epsilon; the
        conditional variance goes with it to a scheduler that learns one (ddpm)."""
        sched = self._sampler(self.cfg.sampling.sampler)
        learned = getattr(sched.config, "variance_type", None) in ("learned", "learned_range")
        sched.set_timesteps(steps)
        x = start_noise(shape, seeds, self._device()) * sched.init_noise_sigma
        gen = torch.Generator().manual_seed(seeds[0])
        c_ch = self.unet.config.in_channels
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            c, u = self.unet(inp, t, **cond).sample, self.unet(inp, t, **uncond).sample
            eps = u[:, :c_ch] + guidance * (c[:, :c_ch] - u[:, :c_ch])
            if learned and c.shape[1] > c_ch:
                eps = torch.cat([eps, c[:, c_ch:]], dim=1)
            x = sched.step(eps, t, x, **({"generator": gen} if learned else {})).prev_sample
        return x


def interpolate(embs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted mix of CLIP embeddings (image fusion, text-and-image fusion), rescaled to
    the weighted mean norm so that the mix stays on the embeddings' shell."""
    w = torch.tensor(weights, dtype=embs[0].dtype, device=embs[0].device)
    w = w / w.sum()
    stack = torch.stack(embs)
    mix = (w[:, None] * stack).sum(0)
    return mix / mix.norm().clamp(min=1e-8) * (w * stack.norm(dim=-1)).sum()


class Kandinsky(Family):
    name = "kandinsky"
    title = "Kandinsky 2.1: a CLIP image prior, then a latent-diffusion decoder on MoVQ latents"
    Config = Config
    demo = Demo(["kandinsky-prior-tiny", "kandinsky-decoder-tiny"],
                "tiny Kandinsky: diffusion prior, then decoder (random-init UNet + MoVQ)", note="text through the prior, text-and-image fusion")

    def build(self, cfg, train_cfg) -> KandinskyModel:
        cfg = self.config(cfg)
        if cfg.stage == "prior" or cfg.use_stored_embeddings:  # the stored embeddings must be the encoder's, before anything loads
            from ..embed_stats import check_stored_width, clip_width

            check_stored_width(train_cfg.data.shards, train_cfg.data.allow_pipe, clip_width(cfg.encoder.path), "model.encoder.path",
                               cfg.encoder.path)
        return KandinskyModel(cfg, train_cfg.data.shards, train_cfg.data.allow_pipe)

    def param_groups(self, model: KandinskyModel, cfg) -> list[dict]:
        name, trained = ("prior", model.prior) if model.cfg.stage == "prior" else ("unet", model.unet)
        return lr_groups({name: [p for p in trained.parameters() if p.requires_grad]}, model.cfg.lr)

    def makes_pictures(self, model) -> bool:
        return model.cfg.stage != "prior"  # a prior makes embeddings

    def demo_prompt(self, paths: list[str]) -> str:
        return f"a red circle <image:{paths[0]}>" if paths else "a red circle"

    def export(self, model: KandinskyModel, out_dir: str) -> list[str]:
        """A diffusers pipeline directory where diffusers has one for the run's model:

        * a decoder run: ``KandinskyPipeline`` (``unet``, ``movq``, ``text_encoder``
          MultilingualCLIP, ``tokenizer``, ``scheduler``: the sampler mmloom samples with,
          ``ddpm`` with the learned variance as ``_sampler`` builds it);
        * a ``released`` prior run: ``KandinskyPriorPipeline`` (``prior`` with the run's
          ``clip_mean`` / ``clip_std``, its UnCLIPScheduler, and the open_clip encoder
          converted to transformers' CLIP: ``text_encoder``, ``tokenizer``,
          ``image_encoder``, ``image_processor``).

        A ``linear``, ``residual`` or ``diffusion`` prior is mmloom's own network, which no
        diffusers pipeline runs: it is exported as before (``conditioning.safetensors``
        with its ``Normalizer`` statistics), and the card says so."""
        from ..export import export_parts, save_pipeline

        if model.cfg.stage == "decoder":
            from diffusers import KandinskyPipeline

            pipe = KandinskyPipeline(text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
                                     scheduler=model._sampler(model.cfg.sampling.sampler), movq=model.ae.model)
            return save_pipeline(pipe, out_dir) + export_parts(model, out_dir, exclude=("unet.", "ae.", "text_encoder."))
        if model.cfg.prior != "released":
            return export_parts(model, out_dir)
        from diffusers import KandinskyPriorPipeline

        from mmloom import clip_convert

        clip = model.clip
        pipe = KandinskyPriorPipeline(prior=model.prior, image_encoder=clip_convert.vision_model(clip),
                                      text_encoder=clip_convert.text_model(clip), tokenizer=clip_convert.tokenizer(clip),
                                      scheduler=model.prior_sched, image_processor=clip_convert.image_processor(clip))
        # the statistics live in prior.clip_mean / clip_std (norm.mean / std mirror them)
        return save_pipeline(pipe, out_dir) + export_parts(model, out_dir, exclude=("prior.", "norm."))

    def export_notes(self, model: KandinskyModel) -> list[str]:
        if model.cfg.stage == "decoder":
            return ["A `KandinskyPipeline` directory (`DiffusionPipeline.from_pretrained`); its `scheduler` is the sampler mmloom "
                    "samples with. It takes `image_embeds` from a prior pipeline (or mmloom's prior run); mmloom's unconditional "
                    "input is the CLIP embedding of a black image: pass it as `negative_image_embeds`."]
        if model.cfg.prior != "released":
            return [f"The `{model.cfg.prior}` prior is mmloom's own network: no diffusers pipeline runs it, so it and its "
                    "normalization statistics (`norm.mean`, `norm.std`) are in `conditioning.safetensors`, as "
                    "`conditioning.json` lists; `mmloom sample` with `model.prior_checkpoint` uses it."]
        return ["A `KandinskyPriorPipeline` directory (`DiffusionPipeline.from_pretrained`): the prior with the run's "
                "normalization (`clip_mean`, `clip_std`), its UnCLIPScheduler, and mmloom's open_clip model converted to "
                "transformers' CLIP for `text_encoder` / `image_encoder`; mmloom feeds the prior what the pipeline's "
                "`_encode_prompt` does (CLIP's `text_embeds` and token states, unnormalized), so the pipeline reproduces the run."]

    def demo_overrides(self, config: str, runs: dict[str, str], dataset_clip: str) -> dict:
        """Both runs use the score stage's CLIP (its stored embeddings); the decoder
        samples text through the prior run trained just before it."""
        over = {"model.encoder.path": dataset_clip}
        if "decoder" in config:
            over["model.prior_checkpoint"] = runs["kandinsky-prior-tiny"]
        return over


FAMILY = Kandinsky()
