"""Every scorer of the score stage, built once per worker from the config.

`ScoreSet` builds the scorers the ``score`` config section asks for (each a
`filters.base.Scorer`), loads each open_clip model once, and `ScoreSet.score(images,
captions)` runs every scorer on a `filters.base.Batch`, returning one list per output
column: each CLIP model encodes a batch once and the heads that need its embedding read
that pass (ARCHITECTURE.md, habit 4). Each column carries the model and version that produced it
(`ScoreSet.meta`). Nothing here knows about Ray, shards or files.
"""

from __future__ import annotations

from .aesthetic import AestheticScorer
from .base import PROBABILITY, Batch, Scorer
from .captions import CaptionCleaner
from .clip_score import ClipScore
from .faces import COLUMNS as FACE_COLUMNS
from .geometry import Geometry, PHash


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# every column a scorer may add, in the order of the scores/ table, with its Arrow type
COLUMN_TYPES = {**Geometry.columns, **CaptionCleaner.columns, **ClipScore.COLUMNS, "nsfw": PROBABILITY,
                "watermark": PROBABILITY, **AestheticScorer.columns, **PHash.columns, **FACE_COLUMNS}


class ScoreSet:
    def __init__(self, cfg):
        """``cfg``: the ``score`` section of the pipeline config (`curate.config.ScoreConfig`),
        read by attribute: filters/ sits below curate/ and does not import it."""
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        # resizing where the models run (the same pixels as Pillow): on a GPU, unless switched off
        self.resize_device = self.device if cfg.resize_on_device and self.device.startswith("cuda") else None
        self.embedders: dict = {}
        self.nudenet = None

        clip = ClipScore(self._embedder(cfg.clip.model), cfg.clip.store_embeddings)

        self.nsfw = None
        if cfg.nsfw.backend == "nudenet":
            from .nsfw import NudeNetNsfw

            self.nsfw = NudeNetNsfw(self._nudenet())
        elif cfg.nsfw.backend == "clip_mlp":
            from .nsfw import ClipMlpNsfw

            self._require(cfg.nsfw.model, "score.nsfw.model", "the NSFW head")
            self.nsfw = ClipMlpNsfw(cfg.nsfw.model, cfg.nsfw.clip_model or cfg.clip.model)
            self._embedder(self.nsfw.needs_clip)
        elif cfg.nsfw.backend == "hf":
            from .hf_classifier import HfImageClassifier

            self._require(cfg.nsfw.model, "score.nsfw.model", "the NSFW classifier")
            self.nsfw = HfImageClassifier(cfg.nsfw.model, cfg.nsfw.positive_labels, self.device, "NSFW classifier", "nsfw")

        self.watermark = None
        w = cfg.watermark
        if w.backend == "timm":
            from .watermark import TimmWatermark

            self._require(w.model, "score.watermark.model", "the watermark checkpoint")
            self.watermark = TimmWatermark(w.model, w.arch, w.head, w.positive_index, self.device, w.image_size)
        elif w.backend == "hf":
            from .hf_classifier import HfImageClassifier

            self._require(w.model, "score.watermark.model", "the watermark classifier")
            self.watermark = HfImageClassifier(w.model, w.positive_labels, self.device, "watermark classifier", "watermark")

        self.aesthetic = None
        if cfg.aesthetic.enabled:
            self.aesthetic = AestheticScorer(cfg.aesthetic.head, cfg.aesthetic.clip_model)
            self._embedder(cfg.aesthetic.clip_model)

        self.faces = None
        if cfg.faces.backend == "opencv":
            from .faces import OpenCvFaces

            self.faces = OpenCvFaces()
        elif cfg.faces.backend == "nudenet":
            from .faces import NudeNetFaces

            self.faces = NudeNetFaces(self._nudenet())

        candidates = [Geometry(), CaptionCleaner(), clip, self.nsfw, self.watermark, self.aesthetic,
                      PHash(self.resize_device) if cfg.phash else None, self.faces]
        self.scorers: list[Scorer] = [s for s in candidates if s is not None]
        self.meta: dict[str, dict[str, str]] = {}
        for s in self.scorers:
            if s.needs_clip:  # loaded above, in config order; any other scorer's model here
                self._embedder(s.needs_clip)
            self.meta.update(s.meta)

    @staticmethod
    def _require(value, key: str, what: str) -> None:
        if not value:
            from mmloom.errors import UserError

            raise UserError(f"{key} is not set: give the path or hub id of {what}, or switch the backend to none")

    def _nudenet(self):
        if self.nudenet is None:
            from .nsfw import NudeNet

            self.nudenet = NudeNet()
        return self.nudenet

    def _embedder(self, ref: str):
        if ref not in self.embedders:
            from mmloom.clip import ClipEmbedder

            self.embedders[ref] = ClipEmbedder(ref, self.device, self.cfg.precision, self.resize_device is not None)
        return self.embedders[ref]

    def columns(self) -> list[str]:
        return [c for s in self.scorers for c in s.columns]

    def prepare(self, images, captions: list[str | None]) -> Batch:
        """One batch with all its CPU work done (each model's input tensors, the clip
        score's caption tokens, nudenet's letterboxing, geometry, caption cleaning, hashes;
        `filters.base.Batch.ready`) and
        no model run yet: what a worker thread makes of batch i+1 while the models run
        batch i (`curate.score.score_shard`)."""
        from mmloom.pil_resample import side_stream

        batch = Batch(images, captions, self.embedders)
        with side_stream(self.resize_device):  # resizes on a GPU: beside the models, not queued behind them
            for ref in self.embedders:
                batch.clip_inputs(ref)
            if self.nudenet is not None:
                batch.nudenet_inputs(self.nudenet)
            for s in self.scorers:
                if hasattr(s, "prepare"):
                    s.prepare(batch)
        return batch

    def score(self, images, captions: list[str | None] | None = None) -> dict[str, list]:
        """Score one batch of PIL images (RGB) with their raw captions, or a batch that
        `prepare` made (then only the models run)."""
        batch = images.again() if isinstance(images, Batch) else Batch(images, captions, self.embedders)
        out: dict[str, list] = {}
        for s in self.scorers:
            out.update(s.score(batch))
        return {c: out[c] for c in self.columns()}
