"""MT-Diffusion (Diffusion Models for Multi-Modal Generative Modeling): several modalities
aggregated into one forward process.

Forward aggregation (section 2.2.2, Theorem 2, appendix B): each modality's data x_i is
encoded into the diffusion space, e_i = E_i(x_i), and added to the noising chain,
q(z_t | z_{t-1}, X) = N(sqrt(alpha_t) (z_{t-1} + w_t e), (1 - alpha_t) I), so that
z_t = sqrt(abar_t) z_0 + alpha~_t e + sqrt(1 - abar_t) eps with
alpha~_t = sqrt(alpha_t) (w_t + alpha~_{t-1}); task weights w_t = t / (T - t) (appendix E).

Reverse model (section 2.2.4): a diffusers UNet predicts the noise, and one decoder head
per modality reads it: a copy of the UNet's output block for image-like data, an MLP on
the pooled middle block for labels and embeddings. Loss (equation 6): MSE of the noise
plus lambda (0.1) times the head's term: cross-entropy for labels, MSE for continuous
data. Encoders carry no trained parameters of their own (section 2.2.4): the autoencoder
for images (as in E.1), the UNet itself through cross-attention for labels and CLIP
embeddings, with the noisy input and timestep set to zero and gradients stopped (E.3).

Tasks (config ``task``):
* ``masked_image`` (section 4.1, E.2): x = the image with m ~ U{0..10} random 16x16
  patches zeroed; its head reconstructs E(x).
* ``image_translation`` (E.1): x = a second picture of the same scene in the same data
  space (``translation_source``: its Canny edges, as Cityscapes' labels -> photo; its
  grayscale, as night -> day; or the sample's first crop), mapped by the same
  autoencoder; its head reconstructs E(x). E.1 leaves open which of the pair is z_0 and
  which the head decodes: mmloom makes the target picture z_0 and the source x, as in
  4.1, so that Algorithm 1 with x given generates the target.
* ``image_label`` (section 4.2, E.3): x = the first crop's label among ``labels``.
* ``image_representation`` (E.4): x = the stored CLIP image embedding of the sample.

MT-Diffusion-U and -X (section 4.1, ``condition_on_data``): U's noise predictor sees only
(z_t, t); X's sees (z_t, X, t). For labels and embeddings X enters through
cross-attention. For pictures the paper does not say how; mmloom concatenates channels
the way diffusers' released UNets for these jobs do, so a released UNet of that layout
loads as is: masked_image as SD 2's inpainting UNet (noisy latent, the patch mask at
latent size, E(x): 9 channels for a 4-channel autoencoder), image_translation as
InstructPix2Pix (noisy latent, E(x): 8 channels). A plain 4-channel UNet gets the extra
input channels zero-initialised (InstructPix2Pix's recipe), which leaves its output
unchanged at the start. Generation from scratch with X gives the complete mask (all
zeros) as x, as section 4.1 does.

Constrained restoration (section 4.1, Table 1; ``generate(..., restore=True)``, ``mmloom
sample --restore``): the prompt's picture is the masked image; masked pixels are its
black ones (as a masked picture is saved; the model's x holds them at 4.1's zero), or the
white pixels of a ``mask`` picture.
Algorithm 1 runs with x given, and after every step the unmasked part of z_{t-1} is
replaced by the forward marginal of the given picture's latent at t-1 (RePaint's
replacement, with equation 4's marginal); the decoded picture is then composited so
that every unmasked pixel is the given one, exactly.

Sampling follows Algorithm 1 (appendix C) over all T steps, the family's only sampler (no
other step count, no classifier-free guidance: the heads' re-estimates guide it): a missing
modality starts "randomly initialized" (the paper's words; mmloom's choices: a label uniform
over the classes, an embedding a random direction of unit length) and is re-estimated from
the heads at every step, each estimate used as the head gives it; z_{t-1} is the posterior mean of equation 5
plus sqrt(beta~_t) noise. One deviation, said here: z_T starts from the forward marginal
N(alpha~_T E(x), (1 - abar_T) I) rather than N(0, I), since with w_t = t / (T - t) the
aggregated term dominates z_T (alpha~_T is in the thousands); with all w_t = 0 the two agree.
"""

from __future__ import annotations

import copy
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmloom.errors import UserError
from ..diffusion import Autoencoder, ScheduleConfig, draw_timesteps, load_unet, start_noise, to_pil
from .base import (AutoencoderConfig, Demo, Family, FamilyConfig, LearningRates, Pretrained,
                                        SamplingDefaults, lr_groups, part)


class Schedule(ScheduleConfig):
    """E.1: a linear schedule over 1000 steps (DDPM's betas)."""

    beta_schedule: str = Field("linear", description="DDPM beta schedule (diffusers name: linear, scaled_linear, squaredcos_cap_v2)")
    beta_start: float = Field(1e-4, gt=0, description="first DDPM beta")
    beta_end: float = Field(0.02, gt=0, description="last DDPM beta")


class LR(LearningRates):
    all: float = Field(1e-4, ge=0, description="the UNet, heads and context embeddings (E.1: 1e-4; E.4: 1e-5)")


class Sampling(SamplingDefaults):
    sampler: Literal["algorithm1"] = Field("algorithm1", description="appendix C, Algorithm 1 (the only one)")
    steps: Optional[int] = Field(None, gt=0, description="null: all T steps of Algorithm 1 (appendix C: T = 1000), the only count allowed")
    guidance: None = Field(None, description="none: Algorithm 1 has no classifier-free guidance")


class Config(FamilyConfig):
    task: Literal["masked_image", "image_translation", "image_label", "image_representation"] = Field(
        "masked_image", description="the extra modality: masked image (4.1), a paired picture (E.1), label (4.2) or CLIP image embedding (E.4)")
    translation_source: Literal["edges", "grayscale", "crop"] = Field(
        "edges", description="image_translation: the source picture x (Canny edges of the image, its grayscale, or its first crop)")
    backbone: Pretrained = part(Pretrained, "the shared backbone: diffusers UNet2DConditionModel",
                                path="stabilityai/stable-diffusion-2-base", subfolder="unet")
    autoencoder: AutoencoderConfig = part(AutoencoderConfig, "diffusers autoencoder", path="stabilityai/stable-diffusion-2-base",
                                          subfolder="vae", type="kl")
    schedule: Schedule = Field(default_factory=Schedule, description="DDPM schedule (E.1: linear, 1000 steps)")
    task_weight: Literal["ratio", "constant"] = Field("ratio", description="w_t: ratio = t / (T - t) (appendix E); constant = task_weight_value")
    task_weight_value: float = Field(1.0, ge=0, description="w_t when task_weight is constant (equation 8: 1)")
    loss_weight: float = Field(0.1, ge=0, description="lambda of equation 6")
    condition_on_data: bool = Field(True, description="MT-Diffusion-X: the noise predictor also sees x (cross-attention for labels and "
                                    "embeddings, extra input channels for pictures); false: MT-Diffusion-U (section 4.1)")
    labels: list[str] = Field(default_factory=list, description="image_label: the classes (a sample's first crop label; anything else is class 'other')")
    max_patches: int = Field(10, ge=0, description="masked_image: m ~ U{0..max_patches} patches per image (4.1)")
    patch_size: int = Field(16, gt=0, description="masked_image: patch side in pixels (4.1)")
    embedding_dim: int = Field(1024, gt=0, description="image_representation: width of the stored CLIP image embeddings (E.4: 1024)")
    head_hidden: int = Field(1024, gt=0, description="image_representation: hidden width of the two-layer MLP head (E.4: 1024)")
    lr: LR = Field(default_factory=LR, description="learning rate (one group)")
    sampling: Sampling = Field(default_factory=Sampling, description="sampling (Algorithm 1)")


class ForwardAggregation:
    """The closed forms of Theorem 2 for one schedule and one weight sequence (float64)."""

    def __init__(self, betas, weights):
        self.betas = np.asarray(betas, np.float64)
        self.alphas = 1.0 - self.betas
        self.abar = np.cumprod(self.alphas)
        self.w = np.asarray(weights, np.float64)
        at, prev = np.zeros_like(self.w), 0.0
        for i in range(len(self.w)):
            prev = np.sqrt(self.alphas[i]) * (self.w[i] + prev)
            at[i] = prev
        self.alpha_tilde = at
        abar_prev = np.concatenate([[1.0], self.abar[:-1]])
        self.beta_tilde = self.betas * (1 - abar_prev) / (1 - self.abar)

    @staticmethod
    def weights(kind: str, T: int, value: float = 1.0) -> np.ndarray:
        t = np.arange(T, dtype=np.float64)  # diffusers' 0-based steps: w_0 = 0, w_{T-1} = T - 1
        return t / (T - t) if kind == "ratio" else np.full(T, value)

    def _c(self, arr, t, like):
        return torch.as_tensor(arr, dtype=like.dtype, device=like.device)[t].view(-1, *([1] * (like.dim() - 1)))

    def marginal(self, z0, e, t, eps):
        """Equation 4: z_t = sqrt(abar_t) z0 + alpha~_t e + sqrt(1 - abar_t) eps."""
        return self._c(np.sqrt(self.abar), t, z0) * z0 + self._c(self.alpha_tilde, t, z0) * e + self._c(np.sqrt(1 - self.abar), t, z0) * eps

    def step(self, z_prev, e, t, eps):
        """One forward transition (equation 3): sqrt(alpha_t) (z_{t-1} + w_t e) + sqrt(1 - alpha_t) eps."""
        return self._c(np.sqrt(self.alphas), t, z_prev) * (z_prev + self._c(self.w, t, z_prev) * e) + self._c(np.sqrt(self.betas), t, z_prev) * eps

    def posterior_mean(self, zt, z0, e, t):
        """Equation 9 (the posterior mean from z_t, z_0 and e), for t >= 1."""
        a, ab, abp = (self._c(x, t, zt) for x in (self.alphas, self.abar, np.concatenate([[1.0], self.abar[:-1]])))
        atp = self._c(np.concatenate([[0.0], self.alpha_tilde[:-1]]), t, zt)
        w = self._c(self.w, t, zt)
        return (a.sqrt() * (1 - abp) * zt + (1 - a) * abp.sqrt() * z0 + ((1 - a) * atp - a * (1 - abp) * w) * e) / (1 - ab)

    def posterior_mean_eps(self, zt, eps, e, t):
        """Equation 5: 1/sqrt(alpha_t) (z_t - (1 - alpha_t)/sqrt(1 - abar_t) eps) - w_t e."""
        a, ab, w = (self._c(x, t, zt) for x in (self.alphas, self.abar, self.w))
        return (zt - (1 - a) / (1 - ab).sqrt() * eps) / a.sqrt() - w * e


def label_in(text: str, classes: list[str]) -> int | None:
    """The class a prompt's text names: the longest class name found in it as whole words
    (case-insensitive; "a red circle" names "red circle", not "circle"); of names equally
    long, the one listed first in ``classes``."""
    words = f" {' '.join(text.lower().split())} "
    hits = [(len(c), -i, i) for i, c in enumerate(classes) if c.strip() and f" {' '.join(c.lower().split())} " in words]
    return max(hits)[2] if hits else None


def patch_mask(shape, max_patches: int, size: int, generator=None) -> torch.Tensor:
    """Section 4.1 / E.2's random mask, [B, 1, H, W] with 1 where a patch covers: m ~
    U{0..max_patches} patches of size x size at random places (they may overlap; cut
    off at the border)."""
    B, _, H, W = shape
    mask = torch.zeros(B, 1, H, W)
    for b in range(B):
        m = int(torch.randint(0, max_patches + 1, (1,), generator=generator))
        for _ in range(m):
            y = int(torch.randint(0, H, (1,), generator=generator))
            x = int(torch.randint(0, W, (1,), generator=generator))
            mask[b, :, y:min(y + size, H), x:min(x + size, W)] = 1.0
    return mask


def mask_patches(pixels: torch.Tensor, max_patches: int, size: int, generator=None) -> torch.Tensor:
    """The masked image of section 4.1: the patches of ``patch_mask`` set to zero."""
    return pixels.masked_fill(patch_mask(pixels.shape, max_patches, size, generator).bool().to(pixels.device), 0.0)


def black_mask(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] of a picture in [-1, 1]: 1 where it is black in every channel, the
    masked pixels of a masked picture as saved to a file (the model's x then holds them
    at section 4.1's zero, mid-grey in [-1, 1])."""
    return (pixels <= -1.0).all(dim=1, keepdim=True).to(pixels.dtype)


def translation_source(kind: str, pixels: torch.Tensor, prompts: list | None = None) -> torch.Tensor:
    """E.1's source picture for each target in ``pixels`` ([-1, 1]): Canny edges, the
    grayscale, or the first crop of the sample's prompt (the target when it has none)."""
    from PIL import Image

    from ..prompts import canny, square

    size = pixels.shape[-1]
    if kind == "grayscale":
        gray = (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]).unsqueeze(1)
        return gray.expand(-1, 3, -1, -1).contiguous()
    out = []
    for i, px in enumerate(pixels):
        arr = ((px.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        img = Image.fromarray(arr)
        if kind == "edges":
            src = canny(img)
        else:
            parts = prompts[i] if prompts is not None else []
            src = next((p for p in parts if isinstance(p, Image.Image)), img)
        src = np.asarray(square(src.convert("RGB"), size), np.float32)
        out.append(torch.from_numpy(src).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out).to(pixels)


IMAGE_TASKS = ("masked_image", "image_translation")


def widen_conv_in(unet, channels: int) -> None:
    """Give ``unet`` ``channels`` input channels, the new ones zero-initialised (the
    InstructPix2Pix recipe: the output is unchanged until training moves them)."""
    old = unet.conv_in
    if old.in_channels == channels:
        return
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding).to(old.weight)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=channels)


class MTDiffusionModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.unet = load_unet(cfg.backbone.path, cfg.backbone.subfolder)
        self.ae = Autoencoder(cfg.autoencoder.path, cfg.autoencoder.subfolder, cfg.autoencoder.type)
        T = cfg.schedule.num_train_timesteps
        from ..diffusion import ddpm

        betas = ddpm(cfg.schedule).betas.numpy()
        self.agg = ForwardAggregation(betas, ForwardAggregation.weights(cfg.task_weight, T, cfg.task_weight_value))
        self.latent_channels = self.ae.latent_channels
        self.image_x = cfg.condition_on_data and cfg.task in IMAGE_TASKS  # MT-Diffusion-X on pictures
        if self.image_x:
            extra = self.latent_channels + (1 if cfg.task == "masked_image" else 0)
            have = self.unet.config.in_channels
            if have not in (self.latent_channels, self.latent_channels + extra):
                raise UserError(f"model.backbone: the UNet has {have} input channels; MT-Diffusion-X on {cfg.task} needs "
                                f"{self.latent_channels} (widened here) or {self.latent_channels + extra}")
            widen_conv_in(self.unet, self.latent_channels + extra)
        elif self.unet.config.in_channels != self.latent_channels:
            raise UserError(f"model.backbone: the UNet has {self.unet.config.in_channels} input channels but the "
                            f"autoencoder's latents have {self.latent_channels}")
        uc = self.unet.config
        cross, mid = uc.cross_attention_dim, uc.block_out_channels[-1]
        # the paper's noise predictor takes no context where x is not one (MT-Diffusion-U; -X on
        # pictures, whose x goes in as channels), SD's UNet needs one: one learned token, N(0, 0.02^2)
        self.null_context = nn.Parameter(torch.randn(1, 1, cross) * 0.02)
        self._feats: dict[str, torch.Tensor] = {}
        self.unet.mid_block.register_forward_hook(lambda _m, _i, out: self._feats.__setitem__("mid", out))
        self.unet.conv_norm_out.register_forward_hook(lambda _m, inp, _o: self._feats.__setitem__("last", inp[0]))
        if cfg.task in IMAGE_TASKS:
            # a copy of the UNet's output block (norm, SiLU, conv): E.1 / E.2
            self.head = nn.Sequential(copy.deepcopy(self.unet.conv_norm_out), nn.SiLU(), copy.deepcopy(self.unet.conv_out))
        elif cfg.task == "image_label":
            if not cfg.labels:
                raise UserError("model.labels is empty: image_label needs the list of classes")
            self.classes = ["other", *cfg.labels]
            self.context = nn.Embedding(len(self.classes), cross)
            # one layer out of the middle block (MT-Diffusion-M), after a LayerNorm: the pooled
            # features grow with alpha~_t (thousands at large t), which a bare layer cannot follow
            self.head = nn.Sequential(nn.LayerNorm(mid), nn.Linear(mid, len(self.classes)))
        else:
            d = cfg.embedding_dim
            self.context = nn.Linear(d, cross)
            # E.4: middle block -> 1024 -> ReLU -> the embedding
            self.head = nn.Sequential(nn.LayerNorm(mid), nn.Linear(mid, cfg.head_hidden), nn.ReLU(), nn.Linear(cfg.head_hidden, d))

    # -- modality data ----------------------------------------------------------------

    def task_data(self, batch: dict, pixels: torch.Tensor):
        """(x, mask) for this batch: masked pixels with their patch mask, the source
        picture, label indices or CLIP embeddings (mask None but for masked_image)."""
        if self.cfg.task == "masked_image":
            mask = patch_mask(pixels.shape, self.cfg.max_patches, self.cfg.patch_size).to(pixels)
            return pixels.masked_fill(mask.bool(), 0.0), mask
        if self.cfg.task == "image_translation":
            return translation_source(self.cfg.translation_source, pixels, batch.get("prompts")), None
        if self.cfg.task == "image_label":
            idx = {c: i for i, c in enumerate(self.classes)}
            labels = []
            for segs in batch["segments"]:
                first = next((s.get("label") or s.get("phrase", "") for s in segs if s.get("type") == "image"), "")
                labels.append(idx.get(str(first).lower(), 0))
            return torch.tensor(labels, device=pixels.device), None
        if batch.get("clip_image") is None:
            raise UserError("image_representation needs the stored CLIP image embeddings (KEY.clip_image.npy in the final "
                            "shards): run the score stage with score.clip.store_embeddings, then build again")
        # unit length, as the score stage's cosine space: build stores CLIP's own scale
        # (Kandinsky's), and this family's task embedding was designed on unit vectors
        emb = torch.nn.functional.normalize(batch["clip_image"].to(pixels.device).float(), dim=-1)
        if emb.shape[-1] != self.cfg.embedding_dim:
            raise UserError(f"model.embedding_dim is {self.cfg.embedding_dim} but the stored CLIP image embeddings are {emb.shape[-1]}-d")
        return emb, None

    def context_of(self, x) -> torch.Tensor:
        """Cross-attention tokens for x (labels: embedding rows or, when soft, their mixture)."""
        if self.cfg.task == "image_label":
            if x.dtype.is_floating_point:  # probabilities estimated during sampling
                return (x @ self.context.weight).unsqueeze(1)
            return self.context(x).unsqueeze(1)
        return self.context(x).unsqueeze(1)

    @torch.no_grad()
    def encode(self, x, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """E(x) in the diffusion space; no trained parameters of its own, gradients stopped;
        ``generator`` draws a picture's latent (sampling from a seed)."""
        if self.cfg.task in IMAGE_TASKS:
            return self.ae.encode(x, generator).to(like.dtype)
        zeros = torch.zeros_like(like)
        t0 = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)
        return self.unet(zeros, t0, encoder_hidden_states=self.context_of(x).to(like.dtype)).sample

    def _denoiser_context(self, x, batch: int) -> torch.Tensor:
        if self.cfg.condition_on_data and self.cfg.task not in IMAGE_TASKS and x is not None:
            return self.context_of(x)
        return self.null_context.expand(batch, -1, -1)

    def _unet_input(self, zt, e, mask) -> torch.Tensor:
        """z_t, and for MT-Diffusion-X on pictures the known x beside it: the patch mask at
        latent size (masked_image) and E(x), in the released UNets' channel order."""
        if not self.image_x:
            return zt
        parts = [zt]
        if self.cfg.task == "masked_image":
            parts.append(F.interpolate(mask.to(zt), size=zt.shape[-2:], mode="nearest"))
        return torch.cat([*parts, e.to(zt)], dim=1)

    def _head(self) -> torch.Tensor:
        if self.cfg.task in IMAGE_TASKS:
            return self.head(self._feats["last"])
        return self.head(self._feats["mid"].mean(dim=(2, 3)))

    # -- training -----------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        pixels = batch["pixels"].to(self.unet.device)
        z0 = self.ae.encode(pixels)
        x, mask = self.task_data(batch, pixels)
        e = self.encode(x, z0)
        t = batch.get("timesteps")  # fixed steps for evaluation; uniform otherwise
        t = draw_timesteps(len(self.agg.w), z0) if t is None else t.to(z0.device)
        eps = torch.randn_like(z0)
        zt = self.agg.marginal(z0, e, t, eps)
        ctx = self._denoiser_context(x, z0.shape[0]).to(zt.dtype)
        pred = self.unet(self._unet_input(zt, e, mask), t, encoder_hidden_states=ctx).sample
        mse = F.mse_loss(pred.float(), eps.float())
        out = self._head()
        if self.cfg.task == "image_label":
            head_loss = F.cross_entropy(out.float(), x)
        else:
            head_loss = F.mse_loss(out.float(), (e if self.cfg.task in IMAGE_TASKS else x).float())
        return {"loss": mse + self.cfg.loss_weight * head_loss, "mse": mse.detach(), "head": head_loss.detach()}

    # -- sampling (Algorithm 1) -----------------------------------------------------------
    def _known(self, parts: list, size: int, device):
        """x given by a prompt: a picture (masked_image: the one to restore;
        image_translation: the source) or a label word."""
        from PIL import Image

        from ..prompts import square

        if self.cfg.task in IMAGE_TASKS:
            img = next((p for p in parts if isinstance(p, Image.Image)), None)
            if img is None:
                return None
            arr = np.asarray(square(img.convert("RGB"), size), np.float32)
            return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(device) / 127.5 - 1.0
        if self.cfg.task == "image_label":
            hit = label_in(" ".join(p for p in parts if isinstance(p, str)), self.classes)
            return None if hit is None else torch.tensor([hit], device=device)
        return None

    def _estimate(self):
        """The head's estimate of a missing modality, in the form ``encode`` takes."""
        out = self._head()
        if self.cfg.task == "image_label":
            return out.float().softmax(-1)
        if self.cfg.task in IMAGE_TASKS:
            return out  # already in the diffusion space
        return out.float()

    def _restore_mask(self, known, mask_image, size: int):
        """[1, 1, size, size], 1 where the picture is to be restored."""
        if mask_image is None:
            mask = black_mask(known)
            if not mask.any():
                raise UserError("--restore: the prompt's picture has no masked pixels (black in every channel); "
                                "give the masked area as a --mask picture (white = restore)")
            return mask
        from ..prompts import square

        arr = np.asarray(square(mask_image.convert("L").convert("RGB"), size), np.float32)[..., 0]
        return torch.from_numpy(arr > 127).to(known).view(1, 1, size, size)

    @torch.no_grad()
    def generate(self, prompts: list[list], steps: int | None = None, guidance: float | None = None, seeds=None,
                 size: int | None = None, restore: bool = False, mask=None, return_labels: bool = False):
        """Algorithm 1 for each prompt. ``restore`` (masked_image): constrained restoration
        of the prompt's picture (see the module docstring); ``mask``: a picture whose white
        pixels are the ones to restore (default: the picture's black pixels).
        ``return_labels`` (image_label): (pictures, labels), each label the one the prompt
        gave or, generated with the picture, the head's last estimate (its most likely class)."""
        T = len(self.agg.w)
        steps = self.cfg.sampling.steps if steps is None else steps
        if steps is not None and steps != T:
            raise UserError(f"MT-Diffusion samples with Algorithm 1 over all T = {T} steps; {steps} steps is not an option")
        if guidance is not None:
            raise UserError("MT-Diffusion's Algorithm 1 has no classifier-free guidance; leave --guidance out")
        if return_labels and self.cfg.task != "image_label":
            raise UserError(f"labels are generated by model.task image_label, not {self.cfg.task}")
        if (restore or mask is not None) and self.cfg.task != "masked_image":
            raise UserError(f"--restore/--mask: constrained restoration needs model.task masked_image, not {self.cfg.task}")
        dev = self.unet.device
        seeds = seeds or list(range(len(prompts)))
        size = size or self.unet.config.sample_size * self.ae.downscale
        h = size // self.ae.downscale
        lat_shape = (self.latent_channels, h, h)
        images, labels = [], []
        for parts, seed in zip(prompts, seeds):
            g = torch.Generator().manual_seed(seed)
            known = self._known(parts, size, dev)
            like = torch.zeros((1, *lat_shape), device=dev)
            pmask = keep = z_given = None
            if restore or mask is not None:
                if known is None:
                    raise UserError("--restore: the prompt needs the masked picture, e.g. --prompt '<image:masked.png>'")
                pmask = self._restore_mask(known, mask, size)
                known = known.masked_fill(pmask.bool(), 0.0)  # x of section 4.1: the masked pixels zero
                given = known  # the unmasked pixels to keep
                keep = 1 - (F.interpolate(pmask, size=(h, h), mode="area") > 0).to(like)  # latent cells with no masked pixel
                z_given = self.ae.encode(given, g).to(like.dtype)
            if self.cfg.task in IMAGE_TASKS:
                if known is None and self.image_x:  # 4.1: X generates from the complete mask
                    known = torch.zeros((1, 3, size, size), device=dev)
                    pmask = torch.ones((1, 1, size, size), device=dev)
                elif known is not None and pmask is None and self.cfg.task == "masked_image":
                    pmask = black_mask(known)
                e = self.encode(known, like, g) if known is not None else torch.randn(like.shape, generator=g).to(dev)
                x = None
            elif self.cfg.task == "image_label":
                # Algorithm 1 "randomly initializes" a missing x; for a label mmloom starts from the
                # uniform distribution over the classes (the least informed start; the head's estimates follow)
                x = known if known is not None else torch.full((1, len(self.classes)), 1.0 / len(self.classes), device=dev)
                e = self.encode(x, like)
            else:
                # for an embedding: a random direction, unit length as every training embedding
                # is (task_data normalizes them); N(0, I) at 1024-d would be ~32 long, a context
                # the model never saw. From the first step on, the head's estimate replaces it
                # as the head gives it (Algorithm 1; the head learned unit-length targets)
                x = F.normalize(torch.randn((1, self.context.in_features), generator=g), dim=-1).to(dev)
                e = self.encode(x, like)
            z = self.agg.marginal(torch.zeros_like(like), e, torch.tensor([T - 1], device=dev), start_noise(lat_shape, [seed], dev))
            for t in range(T - 1, -1, -1):
                tt = torch.tensor([t], device=dev)
                ctx = self._denoiser_context(x, 1)
                eps = self.unet(self._unet_input(z, e, pmask), tt, encoder_hidden_states=ctx.to(z.dtype)).sample
                if known is None:  # Algorithm 1, lines 9-10: re-estimate the missing modality
                    est = self._estimate()
                    if self.cfg.task in IMAGE_TASKS:
                        e = est
                    else:
                        x = est
                        e = self.encode(x, like)
                z = self.agg.posterior_mean_eps(z, eps, e, tt)
                if t > 0:
                    z = z + float(np.sqrt(self.agg.beta_tilde[t])) * torch.randn(z.shape, generator=g).to(dev)
                if keep is not None:  # the unmasked cells follow the given picture's forward marginal at t - 1
                    prev = torch.tensor([t - 1], device=dev)
                    on_chain = z_given if t == 0 else self.agg.marginal(
                        z_given, e, prev, torch.randn(z.shape, generator=g).to(dev))
                    z = keep * on_chain + (1 - keep) * z
            out = self.ae.decode(z)
            if pmask is not None and (restore or mask is not None):
                out = pmask * out + (1 - pmask) * given.to(out)  # every unmasked pixel exactly as given
            images += to_pil(out)
            if self.cfg.task == "image_label":
                labels.append(self.classes[int(x.argmax()) if x.dtype.is_floating_point else int(x.reshape(-1)[0])])
        return (images, labels) if return_labels else images


class MTDiffusion(Family):
    name = "mtdiffusion"
    title = "MT-Diffusion: a second modality aggregated into the forward process, one decoder head per modality"
    Config = Config
    options = frozenset({"restore", "mask"})
    demo = Demo(["mtdiffusion-tiny"], "tiny MT-Diffusion, masked-image training (random-init UNet + VAE)",
                note="a crop given as the masked-image modality")

    def build(self, cfg, train_cfg) -> MTDiffusionModel:
        cfg = self.config(cfg)
        if cfg.task == "image_representation":  # the stored embeddings must be embedding_dim wide, before anything loads
            from ..embed_stats import check_stored_width

            check_stored_width(train_cfg.data.shards, train_cfg.data.allow_pipe, cfg.embedding_dim, "model.embedding_dim", cfg.embedding_dim)
        return MTDiffusionModel(cfg)

    def param_groups(self, model: MTDiffusionModel, cfg) -> list[dict]:
        return lr_groups({"all": [p for p in model.parameters() if p.requires_grad]}, model.cfg.lr)

    def demo_prompt(self, paths: list[str]) -> str:
        return f"<image:{paths[0]}>" if paths else "a cat"


FAMILY = MTDiffusion()
