"""Typed trainer configuration: data, prompt builder, model family, loop.

``family`` names a family in the registry (``train/families/__init__.py``) and ``model``
is validated against that family's own config class when the config is loaded, so a
misspelt ``model.lr.unett`` stops the load with an error naming it, before any output
directory or accelerator exists. Adding a family touches its module and the registry.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mmloom.configbase import Section
from .families import FAMILIES


class DataConfig(Section):
    shards: str = Field("", description="final/ shards: a dataset directory (only shards whose build completion record's sha256 matches), or a glob or brace pattern like final/{00000..00009}.tar (used unverified, with a warning)")
    resolution: int = Field(64, gt=0, description="training image size (images padded to square with black, MUMU section 5)")
    shuffle_buffer: int = Field(64, ge=0, description="webdataset sample shuffle buffer")
    resampled: bool = Field(True, description="sample shards with replacement (endless epochs); false = one pass per epoch over shards split by node and worker")
    num_workers: int = Field(0, ge=0, description="DataLoader workers (exact resume is guaranteed with 0)")
    prefetch: int = Field(2, ge=0, description="with num_workers 0: batches a background thread prepares ahead of the training step, same order (0: in turn)")
    use_weights: bool = Field(True, description="keep each sample with probability weight/max_weight, favouring images with people")
    max_weight: float = Field(2.0, gt=0, description="the largest sample weight in the shards (build.person_weight)")
    max_pixels: int = Field(89_478_485, gt=0, description="skip a sample whose image header declares more pixels than this (checked before decoding, like download.max_pixels)")
    max_member_bytes: int = Field(64 * 2**20, gt=0, description="skip a tar member larger than this (its header size is checked before it is read)")
    allow_pipe: bool = Field(False, description="allow pipe: shard URLs (and webdataset's other shell-run openers); webdataset runs them as shell commands (--allow-pipe)")


class PromptConfig(Section):
    """MUMU section 5 train-time rules."""

    stage: Literal[1, 2] = Field(1, description="1: up to max_crops crops; 2: one high-resolution face or person crop")
    max_crops: int = Field(3, ge=0, description="crops per prompt")
    crop_size: int = Field(252, gt=0, description="stage 1 crop size in pixels (324 tokens = 18x18 patches of 14 px)")
    stage2_crop_size: int = Field(504, gt=0, description="stage 2 crop size (1,296 tokens = 36x36 patches)")
    head_prob: float = Field(0.7, ge=0, le=1, description="person crop replaced by its head crop")
    augment_prob: float = Field(0.2, ge=0, le=1, description="conditioning image augmented (random crop, flip, Gaussian noise, grayscale)")
    structure: bool = Field(False, description="stage 1: add a Canny-edge image of the whole input")
    structure_prob: float = Field(0.3, ge=0, le=1, description="how often the structure image is added")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "cond_dropout" in data:
            raise PydanticCustomError("renamed_key", "prompt.cond_dropout is now model.cond_dropout (every family's "
                                      "conditioning dropout has that name; rename it in the config, or in a saved run's "
                                      "train_config.yaml)")
        return data


class ValidationConfig(Section):
    """Pictures sampled during training with fixed prompts and seeds (``OUT/validation/``
    and the tracker). Off unless ``every`` is set."""

    every: int = Field(0, ge=0, description="steps between validation grids (0: off; the last step always gets one when on)")
    prompts: list[str] = Field(default_factory=list, description="your own interleaved prompts, e.g. 'a <image:man.jpg> man' (paths relative to the working directory)")
    shards: str = Field("", description="held-out final/ shards (a dataset directory, glob or brace pattern, like data.shards): their first num_prompts prompts, built without augmentation")
    num_prompts: int = Field(4, gt=0, description="prompts taken from validation.shards")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1, description="one picture per seed and prompt (grid: a row per prompt, a column per seed)")
    steps: Optional[int] = Field(None, gt=0, description="denoising steps (null: the family's sampling default)")
    guidance: Optional[float] = Field(None, ge=0, description="guidance scale (null: the family's sampling default)")
    size: Optional[int] = Field(None, gt=0, description="picture size (null: data.resolution)")

    @model_validator(mode="after")
    def _has_prompts(self):
        if self.every and not (self.prompts or self.shards):
            raise PydanticCustomError("no_prompts", "validation.every is set but there are no prompts: "
                                      "give validation.prompts or validation.shards")
        return self


class LoopConfig(Section):
    out: str = Field("runs/train", description="output directory: checkpoints/, metrics.jsonl and metrics.csv, loss.png, summary.json, validation/, tensorboard/, train_config.yaml")
    steps: int = Field(100, gt=0, description="optimizer steps")
    batch_size: int = Field(4, gt=0, description="samples per process per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="gradient clipping (null: off)")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision (bf16 on GPUs)")
    distributed: Literal["auto", "ddp", "fsdp"] = Field("auto", description="auto: whatever `accelerate launch` set up; fsdp: wrap with FSDP")
    ema_decay: Optional[float] = Field(None, gt=0, lt=1, description="EMA of trainable weights (null: off)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept on disk")
    log_every: int = Field(1, gt=0, description="steps between log lines")
    seed: int = Field(0, description="seed for weights, noise, data order and augmentation")
    resume: bool = Field(True, description="continue from the latest checkpoint in out/")
    tensorboard: bool = Field(True, description="log to out/tensorboard")
    wandb: bool = Field(False, description="also log to Weights & Biases")
    peak_tflops: Optional[float] = Field(None, gt=0, description="peak FLOP/s of one device for MFU (auto for known GPUs)")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="validation grids during training")


class TrainConfig(Section):
    family: str = Field("mumu", description="model family, from the registry in train/families/__init__.py: " + ", ".join(FAMILIES))
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    model: Any = Field(None, validate_default=True,
                       description="the family's own section: its Config (train/families/FAMILY.py), validated on load")
    loop: LoopConfig = Field(default_factory=LoopConfig)

    @field_validator("family")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in FAMILIES:
            raise PydanticCustomError("unknown_family", "unknown model family; known: {known}", {"known": ", ".join(FAMILIES)})
        return v

    @field_validator("model", mode="before")
    @classmethod
    def _family_section(cls, v, info):
        """``model:`` as the family's Config; its errors carry ``model.`` paths."""
        if "family" not in info.data:  # the family itself is wrong: that error says so
            return v
        from .families import get_family

        config = get_family(info.data["family"]).Config
        if isinstance(v, config):
            return v
        if v is not None and not isinstance(v, dict):
            raise PydanticCustomError("model_section", "must be a mapping of the family's keys")
        return config.model_validate(v or {})
