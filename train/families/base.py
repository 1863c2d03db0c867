"""The Family contract: what every model family supplies, and the config parts they share.

A family is one module in ``train/families/`` defining ``FAMILY``, an instance of a
:class:`Family` subclass, plus one line in the registry (``train/families/__init__.py``):

* ``name`` (the ``family:`` value) and ``title``;
* ``Config``: its pydantic config, the trainer config's ``model:`` section, a subclass of
  :class:`FamilyConfig` (or :class:`GuidedConfig` when it samples with classifier-free
  guidance). ``TrainConfig`` validates ``model:`` against it when the config is loaded,
  before any output directory or accelerator exists;
* ``build(cfg, train_cfg) -> nn.Module`` whose ``forward(batch)`` returns a dict of losses
  with ``loss`` the one to minimize (so DDP/FSDP wrap it unchanged);
* ``param_groups(model, cfg) -> list[dict]`` (each with ``name``, ``params``, ``lr``);
* ``sampling``: its sampling defaults (sampler, steps, guidance, from its paper), which
  live in its config as ``model.sampling`` and which ``mmloom sample --steps/--guidance``
  override only when given;
* ``generate(model, prompts, steps, guidance, seeds, size, **options)`` -> pictures
  (``options``: the family's own sampling arguments, such as M-VADER's ``theta``);
  ``generate_text`` where the family has text outputs;
* ``makes_pictures(model)``: False for a run whose ``generate`` gives no pictures (a
  Kandinsky prior), so validation grids skip it;
* ``export(model, out_dir)``: the trained parts in their libraries' own formats
  (``mmloom export``; the default exports every diffusers model, peft adapter and the
  remaining trained tensors, see ``train/export.py``; a family with a diffusers pipeline
  writes the whole pipeline directory) and ``export_notes(model)`` for the card;
* ``demo``: the tiny configs ``mmloom demo --family NAME`` trains and how it prompts them.

Shared parts, one name each in every family's config: ``backbone`` (the denoising
network), ``autoencoder`` (image latents), ``encoder`` (the conditioning model, where the
family has one), ``schedule`` (the DDPM training schedule), ``lr`` (one learning rate per
parameter group; 0 leaves the group out of the optimizer), ``cond_dropout`` (conditioning
replaced by the unconditional input, for classifier-free guidance) and ``sampling``.
Keys that older configs and saved runs used (``vae``, ``vlm``, ``lr_unet``, ...) stop the
load with one line naming their new place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from mmloom.configbase import Section, load_model
from mmloom.errors import UserError
from ..diffusion import ScheduleConfig

Sampler = Literal["ddim", "pndm"]


# -- shared config parts ----------------------------------------------------------------------
class Pretrained(Section):
    path: str = Field(..., description="hub id or local directory (tiny:NAME: a built-in tiny random-weight model)")
    subfolder: Optional[str] = Field(None, description="subfolder inside `path` (null: none)")


class AutoencoderConfig(Pretrained):
    type: Literal["kl", "vq"] = Field("kl", description="kl: diffusers AutoencoderKL; vq: VQModel (MoVQ)")


class VLMEncoderConfig(Section):
    path: str = Field(..., description="transformers image-text-to-text model: hub id or local directory")
    image_size: Optional[int] = Field(None, gt=0, description="input size of each image (null: the family's default)")
    bypass_resampler: bool = Field(..., description="Idefics2: drop the perceiver, one token per patch")


class ClipEncoderConfig(Section):
    path: str = Field(..., description="open_clip model: ARCH/TAG, hf-hub:REPO or a directory")


class LearningRates(Section):
    """One learning rate per parameter group: a family subclasses it with one field per
    group (the group's name). A rate of 0 leaves that group out of the optimizer."""


class SamplingDefaults(Section):
    """What ``mmloom sample`` uses unless told otherwise (``--steps``, ``--guidance``, or
    ``--set model.sampling.KEY=VALUE``); each family sets its paper's values."""

    sampler: str = Field(..., description="the sampling algorithm")
    steps: Optional[int] = Field(..., gt=0, description="denoising steps")
    guidance: Optional[float] = Field(..., ge=0, description="classifier-free guidance scale")

    def summary(self) -> str:
        """'DDIM 50 steps, guidance 6.0' (for the demo and logs)."""
        name = {"ddim": "DDIM", "pndm": "PNDM", "algorithm1": "Algorithm 1"}.get(self.sampler, self.sampler)
        steps = "over all T steps" if self.steps is None else f"{self.steps} steps"
        guided = "" if self.guidance is None else f", guidance {self.guidance:g}"
        return f"{name} {steps}{guided}"


# the shared parts' old names, the same in every family that had them
SHARED_RENAMED = {
    "unet": "backbone.path", "unet_subfolder": "backbone.subfolder", "vae": "autoencoder.path",
    "vae_subfolder": "autoencoder.subfolder", "autoencoder_subfolder": "autoencoder.subfolder",
    "autoencoder_type": "autoencoder.type", **{k: f"schedule.{k}" for k in ScheduleConfig.model_fields},
}


def part(cls: type[Section], description: str, **values) -> Any:
    """A sub-config field whose default is ``cls(**values)``; keys a config leaves out keep
    these values (see :meth:`FamilyConfig._renamed_keys_and_defaults`)."""
    return Field(default_factory=lambda: cls(**values), description=description)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class FamilyConfig(Section):
    """The ``model:`` section every family shares. Subclasses give each part its family's
    defaults (with :func:`part` or a subclass) and add their own keys."""

    RENAMED: ClassVar[dict[str, str]] = {}  # a family's own old keys -> where they live now (dotted, under model.)

    backbone: Pretrained = Field(..., description="the denoising network")
    autoencoder: AutoencoderConfig = Field(..., description="the image autoencoder (latents)")
    schedule: ScheduleConfig = Field(..., description="DDPM training schedule")
    lr: LearningRates = Field(..., description="learning rate per parameter group (0: the group is left out)")
    sampling: SamplingDefaults = Field(..., description="sampling defaults")

    @classmethod
    def renamed_keys(cls) -> dict[str, str]:
        """Every old key of this family: the names all families used for the shared parts
        (``unet``, ``vae``, flat schedule keys, ``lr_GROUP`` for each of its groups), then
        its own ``RENAMED``."""
        lr = cls.model_fields["lr"].get_default(call_default_factory=True)
        groups = type(lr).model_fields if isinstance(lr, BaseModel) else {}
        return {**SHARED_RENAMED, **{f"lr_{g}": f"lr.{g}" for g in groups}, **cls.RENAMED}

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys_and_defaults(cls, data):
        """Old key names stop the load naming their new place; a sub-config given in part
        keeps the family's defaults for the keys it leaves out."""
        if not isinstance(data, dict):
            return data
        renamed = cls.renamed_keys()
        moved = {k: renamed[k] for k in data if k in renamed}
        for name, f in cls.model_fields.items():
            given = data.get(name)
            default = f.get_default(call_default_factory=True)
            if isinstance(default, BaseModel) and "path" in type(default).model_fields and isinstance(given, str):
                moved[name] = f"{name}.path"
            elif name == "lr" and isinstance(given, (int, float)) and not isinstance(given, bool):
                moved[name] = "lr.GROUP (one rate per group: " + ", ".join(type(default).model_fields) + ")"
        if moved:
            raise PydanticCustomError("renamed_key", "{msg}", {"msg": "renamed keys: " + ", ".join(
                f"model.{old} is now model.{new}" for old, new in moved.items())
                + " (rename them in the config, or in a saved run's train_config.yaml)"})
        out = dict(data)
        for name, f in cls.model_fields.items():
            given = data.get(name)
            if isinstance(given, dict):
                default = f.get_default(call_default_factory=True)
                if isinstance(default, BaseModel):
                    out[name] = _merge(default.model_dump(), given)
        return out


class GuidedConfig(FamilyConfig):
    """A family sampled with classifier-free guidance: it trains with conditioning dropout."""

    cond_dropout: float = Field(0.1, ge=0, le=1, description="conditioning replaced by the unconditional input (classifier-free guidance)")


def describe_config(cfg: BaseModel, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) rows of a config instance (README's reference): a shared
    part's keys are described by the part, then by themselves (a family's ``lr`` and
    ``sampling`` keys describe themselves)."""
    rows = []
    for name, f in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            own = isinstance(value, (LearningRates, SamplingDefaults))
            for key, default, desc in describe_config(value, f"{prefix}{name}."):
                rows.append((key, default, f"{f.description}: {desc}" if desc and f.description and not own else desc))
        else:
            rows.append((prefix + name, repr(value), f.description or ""))
    return rows


def lr_groups(groups: dict[str, list], lr: LearningRates) -> list[dict]:
    """Optimizer groups from ``{group name: parameters}`` and the config's rates: groups
    with no parameters or a rate of 0 are left out."""
    rates = lr.model_dump()
    unknown = set(groups) - set(rates)
    if unknown:
        raise ValueError(f"parameter groups {sorted(unknown)} have no learning rate in {type(lr).__name__}")
    return [{"name": k, "params": v, "lr": rates[k]} for k, v in groups.items() if v and rates[k] > 0]


def make_sampler(name: str, train_scheduler_config):
    """The diffusers scheduler for ``name`` (``ddim``, ``pndm``) on the training schedule."""
    from diffusers import DDIMScheduler, PNDMScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(train_scheduler_config)
    if name == "pndm":  # the pseudo-numerical method, as Stable Diffusion runs it
        return PNDMScheduler.from_config(train_scheduler_config, skip_prk_steps=True)
    raise UserError(f"unknown sampler {name!r}: ddim or pndm")


# -- the family ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Demo:
    """What ``mmloom demo --family NAME`` trains (tiny configs in configs/train/, in order)
    and how it samples the last one."""

    configs: list[str]
    what: str
    prompt_images: int = 1  # crops from the demo shards put into the prompt
    note: str = ""  # said after the sampling defaults, e.g. "text-and-image fusion"
    options: dict = field(default_factory=dict)  # the family's own generate() arguments


class Family:
    """Base class of the families; see the module docstring for the contract."""

    name: ClassVar[str]
    title: ClassVar[str]
    Config: ClassVar[type[FamilyConfig]]
    demo: ClassVar[Demo]
    options: ClassVar[frozenset] = frozenset()  # generate() arguments beyond the shared ones
    text_outputs: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        missing = [a for a in ("name", "title", "Config", "demo") if not hasattr(cls, a)]
        if missing:
            raise TypeError(f"family {cls.__name__} lacks {missing}")

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    @property
    def sampling(self) -> SamplingDefaults:
        """The sampling defaults of a config that leaves them as they are."""
        return self.Config().sampling

    def config(self, cfg) -> FamilyConfig:
        """``cfg`` as this family's Config (a ``model:`` dict is validated)."""
        if isinstance(cfg, self.Config):
            return cfg
        return load_model(self.Config, data=cfg, source="model")

    def build(self, cfg, train_cfg):
        raise NotImplementedError

    def param_groups(self, model, cfg) -> list[dict]:
        raise NotImplementedError

    def generate(self, model, prompts, steps: int | None = None, guidance: float | None = None, seeds=None,
                 size: int | None = None, **options):
        """Pictures for ``prompts``; ``steps``/``guidance`` None: ``model.sampling``'s."""
        unknown = set(options) - set(self.options)
        if unknown:
            raise UserError(f"{', '.join(sorted(unknown))}: not a sampling option of {self.name}"
                            + (f" (it has {', '.join(sorted(self.options))})" if self.options else ""))
        return model.generate(prompts, steps, guidance, seeds, size, **options)

    def makes_pictures(self, model) -> bool:
        """Whether ``generate`` gives pictures for this built model (validation grids, export's card)."""
        return True

    def export(self, model, out_dir: str) -> list[str]:
        """Write the trained parts of ``model`` into ``out_dir`` in their libraries' formats
        (``mmloom export``); the paths written, relative to ``out_dir``. The default
        (``train/export.py``) covers diffusers models, peft adapters and the other trained
        tensors; a family overrides it to add, e.g., a whole pipeline directory."""
        from ..export import export_parts

        return export_parts(model, out_dir)

    def export_notes(self, model) -> list[str]:
        """Lines for the export's model card: what the export holds and how it differs from
        the run (what has no library format, what a pipeline does differently)."""
        return []

    def generate_text(self, model, prompts, steps: int | None = None, guidance: float | None = None, seeds=None) -> list[str]:
        raise UserError(f"--text needs a family with text outputs; {self.name} makes pictures")

    def demo_prompt(self, paths: list[str]) -> str:
        """The demo's prompt from ``paths`` (crops of the demo shards, possibly fewer than asked)."""
        return f"a photo of <image:{paths[0]}>" if paths else "a red circle"

    def demo_overrides(self, config: str, runs: dict[str, str], dataset_clip: str) -> dict:
        """Extra ``--set``-style overrides for the tiny ``config`` in the demo: ``runs``
        maps the demo configs trained so far to their run directories; ``dataset_clip``
        is the CLIP the score stage stored embeddings with."""
        return {}
