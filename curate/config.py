"""Typed, validated configuration for the curation stages.

One YAML file holds every stage's settings (one section per stage); each command reads
its own section. Everything is checked when the file is loaded: an unknown key or a bad
value is a `UserError` naming the file and the dotted key, before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from mmloom.configbase import Section, describe, load_model  # noqa: F401  (describe re-exported)
from ..manifests.schemas import STAGE_ORDER


class PrefilterConfig(Section):
    """Cheap filters on metadata columns, applied at ingest where the column exists.

    Defaults: Versatile Diffusion section 4.1. `null` switches a rule off. A row whose
    column is missing or null passes the rule (the score stage measures it for real).
    """

    min_aspect: Optional[float] = Field(0.6, gt=0, description="minimum width/height")
    max_aspect: Optional[float] = Field(1.6667, gt=0, description="maximum width/height")
    min_area: Optional[float] = Field(0.75 * 256**2, ge=0, description="minimum width*height in pixels")
    min_clip_similarity: Optional[float] = Field(0.3, description="minimum precomputed CLIP image-text similarity")
    max_nsfw: Optional[float] = Field(0.3, description="maximum precomputed NSFW probability (LAION punsafe, COYO max of its two scores)")
    max_watermark: Optional[float] = Field(0.3, description="maximum precomputed watermark probability")
    min_aesthetic: Optional[float] = Field(None, description="minimum precomputed aesthetic score (off by default)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_aspect is not None and self.max_aspect is not None and self.min_aspect > self.max_aspect:
            raise ValueError(f"min_aspect ({self.min_aspect}) is above max_aspect ({self.max_aspect})")
        return self


class IngestConfig(Section):
    format: Literal["auto", "laion", "coyo", "generic"] = Field("auto", description="metadata schema; auto detects LAION / COYO / url+text")
    url_col: Optional[str] = Field(None, description="url column for generic tables (case-insensitive)")
    caption_col: Optional[str] = Field(None, description="caption column for generic tables (case-insensitive)")
    shard_size: int = Field(10_000, gt=0, description="rows per candidate shard")
    prefilter: PrefilterConfig = Field(default_factory=PrefilterConfig)


class DownloadConfig(Section):
    image_size: int = Field(256, gt=0, description="target size in pixels (img2dataset image_size)")
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = Field(
        "keep_ratio", description="img2dataset resize mode"
    )
    resize_only_if_bigger: bool = Field(False, description="never upscale")
    encode_format: Literal["jpg", "png", "webp"] = Field("jpg", description="format images are re-encoded to")
    encode_quality: int = Field(95, ge=0, le=100, description="JPEG/WebP quality (PNG: compression 0-9)")
    thread_count: int = Field(64, gt=0, description="download threads per shard worker")
    timeout: float = Field(10.0, gt=0, description="seconds one step of a request may wait (connect, TLS handshake, each read)")
    deadline: float = Field(30.0, gt=0, description="total seconds per URL, redirects included; a slower transfer is failed_to_download")
    max_body_bytes: int = Field(32 * 2**20, gt=0, description="largest response body read (bytes); a longer one is failed_to_download, its connection closed")
    retries: int = Field(0, ge=0, description="extra attempts per URL inside a shard")
    max_pixels: int = Field(89_478_485, gt=0, description="refuse images whose decoded size is above this many pixels (PIL's bomb limit)")
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai"],
        description="X-Robots-Tag directives that opt an image out; [] to ignore the header",
    )
    allow_private_addresses: bool = Field(False, description="allow URLs resolving to private/loopback/link-local addresses")
    user_agent_token: Optional[str] = Field("mmloom", description="token added to the User-Agent and matched in X-Robots-Tag")
    cpus_per_shard: float = Field(1.0, gt=0, description="Ray CPUs reserved by one shard task")
    shard_retries: int = Field(3, ge=0, description="Ray retries of a shard whose worker died")


class ClipConfig(Section):
    model: str = Field("ViT-B-32/openai", description="open_clip model for clip_score: ARCH/PRETRAINED, hf-hub:ORG/REPO or a local dir (LAION's 0.28-0.3 thresholds were set with ViT-B-32 OpenAI)")
    store_embeddings: bool = Field(True, description="store normalized image and text embeddings in scores/ (reused by heads, dedup and the Kandinsky prior)")


class NsfwConfig(Section):
    backend: Literal["nudenet", "clip_mlp", "hf", "none"] = Field("nudenet", description="nudenet (ships weights), clip_mlp (head on CLIP embeddings), hf (image classifier) or none")
    model: Optional[str] = Field(None, description="clip_mlp: head state dict file/dir; hf: model id or dir")
    clip_model: Optional[str] = Field(None, description="clip_mlp: CLIP model whose embeddings feed the head (default score.clip.model)")
    positive_labels: list[str] = Field(default_factory=lambda: ["nsfw", "porn", "hentai", "sexy", "explicit"], description="hf: label patterns counted as NSFW")


class WatermarkConfig(Section):
    backend: Literal["timm", "hf", "none"] = Field("timm", description="timm (LAION detector design), hf (image classifier) or none")
    model: Optional[str] = Field("hf-hub:kiriyamaX/laion-watermark/watermark_model_v1.pt", description="checkpoint file/dir (timm) or model id/dir (hf)")
    arch: str = Field("efficientnet_b3a", description="timm architecture of the checkpoint")
    head: Literal["laion", "linear"] = Field("laion", description="classifier head: LAION's 625-256-2 MLP or timm's linear")
    positive_index: int = Field(0, ge=0, le=1, description="timm: output class that means watermark (LAION: 0)")
    image_size: int = Field(256, gt=0, description="timm: square input size")
    positive_labels: list[str] = Field(default_factory=lambda: ["watermark"], description="hf: label patterns counted as watermark")


class AestheticConfig(Section):
    enabled: bool = Field(True, description="compute the aesthetic score")
    clip_model: str = Field("ViT-L-14/openai", description="CLIP whose normalized image embeddings feed the head (predictor v2: ViT-L-14)")
    head: str = Field("hf-hub:camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth", description="MLP state dict file/dir in LAION's layout")


class FacesConfig(Section):
    backend: Literal["opencv", "nudenet", "none"] = Field("opencv", description="face detector that ships its weights")


class ScoreConfig(Section):
    batch_size: int = Field(32, gt=0, description="images per model call")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="open_clip weights precision (autocast bf16 on GPU regardless)")
    num_workers: Optional[int] = Field(None, gt=0, description="scoring actors (default: one per GPU, or CPUs / cpus_per_worker)")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs per scoring actor")
    gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPU fraction per scoring actor (0 on CPU-only machines)")
    clip: ClipConfig = Field(default_factory=ClipConfig)
    nsfw: NsfwConfig = Field(default_factory=NsfwConfig)
    watermark: WatermarkConfig = Field(default_factory=WatermarkConfig)
    aesthetic: AestheticConfig = Field(default_factory=AestheticConfig)
    faces: FacesConfig = Field(default_factory=FacesConfig)
    phash: bool = Field(True, description="compute the perceptual hash for near-duplicate grouping")
    resize_on_device: bool = Field(True, description="with the models on a GPU, resize there too (open_clip's resize and crop, phash's grey 32x32) with Pillow's arithmetic, the same pixels: the CPU then only decodes")


class SelectConfig(Section):
    """Thresholds compiled into one DuckDB query; null switches a rule off. Defaults:
    Versatile Diffusion section 4.1; aesthetic, min_side (M-VADER 3.2) and max_people
    (MUMU 4) are ready to switch on."""

    min_clip_score: Optional[float] = Field(0.3, description="minimum clip_score")
    max_nsfw: Optional[float] = Field(0.3, description="nsfw must be below this")
    max_watermark: Optional[float] = Field(0.3, description="watermark must be below this")
    min_aspect: Optional[float] = Field(0.6, gt=0, description="minimum original width/height")
    max_aspect: Optional[float] = Field(1.6667, gt=0, description="maximum original width/height")
    min_area: Optional[float] = Field(0.75 * 256**2, ge=0, description="minimum original width*height")
    min_aesthetic: Optional[float] = Field(None, description="aesthetic must be above this (M-VADER: 5)")
    min_side: Optional[int] = Field(None, ge=0, description="minimum original shorter side (M-VADER: 512)")
    max_people: Optional[int] = Field(None, ge=0, description="maximum face count (MUMU: 1)")
    require_clean_caption: bool = Field(True, description="reject captions that are empty after cleaning")
    dedup_max_distance: Optional[int] = Field(4, ge=0, le=15, description="perceptual hashes within this many bits are near-duplicates (one kept); null = off")
    semantic_dedup_threshold: Optional[float] = Field(0.95, gt=0, le=1, description="images whose stored CLIP image embeddings have at least this cosine similarity are one group, of which the best (highest clip_score, then largest) is kept; null = off")
    semantic_dedup_neighbors: int = Field(16, ge=1, le=1024, description="nearest neighbours looked up per image for semantic dedup (the k of the k-NN index)")


PERSON_WORDS = [
    "person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid", "baby",
    "lady", "guy", "astronaut", "player", "student", "worker", "soldier", "bride", "groom", "model", "actor",
    "actress", "athlete", "teenager", "adult", "human", "couple", "family", "friends", "doctor", "chef",
]


class OriginalDinoConfig(Section):
    """IDEA-Research's own Grounding DINO package (groundingdino-py), ``ground.backend: groundingdino``."""

    weights: str = Field("hf-hub:ShilongLiu/GroundingDINO/groundingdino_swint_ogc.pth",
                         description="released checkpoint (.pth read weights-only, or .safetensors): local file or directory, or hf-hub:ORG/REPO/FILE")
    config: str = Field("SwinT_OGC", description="model settings: SwinT_OGC or SwinB_cfg (the package's own), or a local file of "
                        "NAME = literal lines (read as literals, never run)")
    text_encoder: str = Field("bert-base-uncased", description="the BERT it reads captions with (transformers format): hub id or local dir")
    image_size: int = Field(800, gt=0, description="shorter image side fed to the model (the package's inference: 800)")
    max_size: int = Field(1333, gt=0, description="longest image side after resizing (the package's inference: 1333)")


class GroundConfig(Section):
    backend: Literal["transformers", "groundingdino", "boxes"] = Field(
        "transformers", description="transformers: the transformers port (ground.model); groundingdino: IDEA-Research's "
                                    "package and its released checkpoints (ground.groundingdino); boxes: the boxes supplied "
                                    "with the metadata (ground.boxes_column), as COCO or Objects365 come with boxes")
    model: str = Field("IDEA-Research/grounding-dino-tiny", description="backend transformers: Grounding DINO (transformers format), hub id or local dir")
    groundingdino: OriginalDinoConfig = Field(default_factory=OriginalDinoConfig, description="backend groundingdino: the package's model")
    boxes_column: str = Field("boxes", min_length=1, description="backend boxes: the metadata column (its name in the source file) holding a list of {phrase, box: [x0, y0, x1, y1]} records, or their JSON text; boxes in pixels of the original picture")
    max_boxes: int = Field(64, gt=0, description="backend boxes: a sample supplying more records than this has them all refused (counted)")
    box_threshold: float = Field(0.35, ge=0, le=1, description="minimum box confidence (max token probability)")
    text_threshold: float = Field(0.25, ge=0, le=1, description="minimum probability for a caption token to belong to the box's phrase")
    batch_size: int = Field(8, gt=0, description="images per model call (each with its own caption)")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N")
    num_workers: Optional[int] = Field(None, gt=0, description="grounding actors (default: one per GPU, or CPUs / cpus_per_worker)")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs per grounding actor")
    gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPU fraction per grounding actor")
    person_words: list[str] = Field(default_factory=lambda: list(PERSON_WORDS), description="a phrase containing one of these words is a person")
    head_source: Literal["face", "detector", "none"] = Field("face", description="head box inside each person box: OpenCV face cascade (ships weights), the grounding model prompted with 'head', or none")
    head_expand: float = Field(1.8, ge=1, description="face box -> head box scale (hair, chin)")


class BuildConfig(Section):
    """Crop rules (MUMU section 4) and final shard settings."""

    min_crop_area: float = Field(150 * 150, ge=0, description="drop crops whose area is below this many pixels (MUMU: 150x150)")
    max_crop_fraction: float = Field(0.75, gt=0, le=1, description="drop crops covering more than this fraction of the image (MUMU: 75%)")
    max_crops: int = Field(3, ge=0, description="crops per prompt (MUMU: at most 3), distinct phrases first")
    merge_iou: float = Field(0.5, ge=0, le=1, description="boxes of one phrase overlapping at least this IoU are one object")
    min_crops: int = Field(1, ge=0, description="samples with fewer surviving crops are left out (reason recorded)")
    person_weight: float = Field(2.0, gt=0, description="sampling weight of samples with a person crop (others 1.0): lets training favour people")
    crop_quality: int = Field(95, ge=1, le=100, description="JPEG quality of crop members")
    card_examples: int = Field(4, ge=0, description="example prompts pictured in the dataset card")


class RunConfig(Section):
    """What `mmloom run PIPELINE.yaml` runs on."""

    sources: list[str] = Field(default_factory=list, description="metadata parquet files, globs or folders")
    out: Optional[str] = Field(None, description="dataset directory")
    ray_address: Optional[str] = Field(None, description="Ray cluster address (null: Ray in process)")
    stages: list[Literal[tuple(STAGE_ORDER)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(STAGE_ORDER), description="stages to run, in order")


class PipelineConfig(Section):
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    ground: GroundConfig = Field(default_factory=GroundConfig)
    build: BuildConfig = Field(default_factory=BuildConfig)
    run: RunConfig = Field(default_factory=RunConfig)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load and validate a pipeline YAML (defaults when ``path`` is None), then apply
    ``overrides`` ({"section.key": value}; None means "not given", so to switch a rule
    off pass the whole section: {"select": {"min_clip_score": None}})."""
    return load_model(PipelineConfig, path, overrides)
