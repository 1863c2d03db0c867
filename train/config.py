"""Typed trainer configuration: data, prompt builder, model family, loop.

The family section (``model``) is validated by the family itself (each family module
declares its own config class), so adding a family touches one file and the registry.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from mmloom.configbase import Section


class DataConfig(Section):
    shards: str = Field("", description="final/ shards: a dataset directory (only shards whose build completion record's sha256 matches), or a glob or brace pattern like final/{00000..00009}.tar (used unverified, with a warning)")
    resolution: int = Field(64, gt=0, description="training image size (images padded to square with black, MUMU section 5)")
    shuffle_buffer: int = Field(64, ge=0, description="webdataset sample shuffle buffer")
    resampled: bool = Field(True, description="sample shards with replacement (endless epochs); false = one pass per epoch over shards split by node and worker")
    num_workers: int = Field(0, ge=0, description="DataLoader workers (exact resume is guaranteed with 0)")
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
    cond_dropout: float = Field(0.1, ge=0, le=1, description="prompt replaced by the empty prompt (classifier-free guidance)")


class LoopConfig(Section):
    out: str = Field("runs/train", description="output directory: checkpoints/, metrics.jsonl, tensorboard/, train_config.yaml")
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


class TrainConfig(Section):
    family: Literal["mumu", "mvader", "versatile", "mtdiffusion", "kandinsky"] = Field(
        "mumu", description="model family (train/families/): mumu, mvader, versatile, mtdiffusion, kandinsky")
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    model: dict[str, Any] = Field(default_factory=dict, description="the family's own config section")
    loop: LoopConfig = Field(default_factory=LoopConfig)
