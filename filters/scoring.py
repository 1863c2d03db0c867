"""Every scorer of the score stage, built once per worker from the config.

`ScoreSet.score(images, captions)` returns one list per output column. Each CLIP model
encodes a batch once; heads that need its embedding read it (STYLE habit 4). Each column
carries the model and version that produced it (`ScoreSet.field_metadata`).
Nothing here knows about Ray, shards or files.
"""

from __future__ import annotations

import pyarrow as pa

from mmloom import __version__
from mmloom.curate.captions import clean_caption
from mmloom.curate.config import ScoreConfig
from mmloom.filters.geometry import geometry, phash


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


COLUMN_TYPES = {
    "width": pa.int32(), "height": pa.int32(), "aspect": pa.float32(), "area": pa.int64(), "min_side": pa.int32(),
    "clean_caption": pa.string(), "caption_reason": pa.string(),
    "clip_score": pa.float32(), "clip_image_embedding": pa.list_(pa.float32()), "clip_text_embedding": pa.list_(pa.float32()),
    "nsfw": pa.float32(), "watermark": pa.float32(), "aesthetic": pa.float32(),
    "phash": pa.string(), "phash_int": pa.int64(),
    "face_count": pa.int32(), "face_boxes": pa.list_(pa.list_(pa.int32())),
}


class ScoreSet:
    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.embedders: dict = {}
        self.meta: dict[str, dict[str, str]] = {}
        own = f"mmloom {__version__}"
        for c in ("width", "height", "aspect", "area", "min_side"):
            self.meta[c] = {"model": "geometry of the downloaded image", "version": own}
        for c in ("clean_caption", "caption_reason"):
            self.meta[c] = {"model": "Versatile Diffusion appendix C.1 rules", "version": own}

        clip = self._embedder(cfg.clip.model)
        for c in ("clip_score", "clip_image_embedding", "clip_text_embedding"):
            self.meta[c] = {"model": cfg.clip.model, "version": clip.version}

        self.nudenet = None
        self.nsfw = None
        if cfg.nsfw.backend == "nudenet":
            from mmloom.filters.nsfw import NudeNetNsfw

            self.nsfw = NudeNetNsfw(self._nudenet())
        elif cfg.nsfw.backend == "clip_mlp":
            from mmloom.filters.nsfw import ClipMlpNsfw

            self._require(cfg.nsfw.model, "score.nsfw.model", "the NSFW head")
            self.nsfw = ClipMlpNsfw(cfg.nsfw.model, cfg.nsfw.clip_model or cfg.clip.model)
            self._embedder(self.nsfw.needs_clip)
        elif cfg.nsfw.backend == "hf":
            from mmloom.filters.hf_classifier import HfImageClassifier

            self._require(cfg.nsfw.model, "score.nsfw.model", "the NSFW classifier")
            self.nsfw = HfImageClassifier(cfg.nsfw.model, cfg.nsfw.positive_labels, self.device, "NSFW classifier")
        if self.nsfw:
            self.meta["nsfw"] = {"model": f"nsfw/{cfg.nsfw.backend}:{cfg.nsfw.model or 'nudenet'}", "version": self.nsfw.version}

        self.watermark = None
        w = cfg.watermark
        if w.backend == "timm":
            from mmloom.filters.watermark import TimmWatermark

            self._require(w.model, "score.watermark.model", "the watermark checkpoint")
            self.watermark = TimmWatermark(w.model, w.arch, w.head, w.positive_index, self.device, w.image_size)
        elif w.backend == "hf":
            from mmloom.filters.hf_classifier import HfImageClassifier

            self._require(w.model, "score.watermark.model", "the watermark classifier")
            self.watermark = HfImageClassifier(w.model, w.positive_labels, self.device, "watermark classifier")
        if self.watermark:
            self.meta["watermark"] = {"model": f"watermark/{w.backend}:{w.model}", "version": self.watermark.version}

        self.aesthetic = None
        if cfg.aesthetic.enabled:
            from mmloom.filters.aesthetic import AestheticScorer

            self.aesthetic = AestheticScorer(cfg.aesthetic.head, cfg.aesthetic.clip_model)
            self._embedder(cfg.aesthetic.clip_model)
            self.meta["aesthetic"] = {"model": cfg.aesthetic.head, "version": self.aesthetic.version}

        self.faces = None
        if cfg.faces.backend == "opencv":
            from mmloom.filters.faces import OpenCvFaces

            self.faces = OpenCvFaces()
        elif cfg.faces.backend == "nudenet":
            from mmloom.filters.faces import NudeNetFaces

            self.faces = NudeNetFaces(self._nudenet())
        if self.faces:
            for c in ("face_count", "face_boxes"):
                self.meta[c] = {"model": f"faces/{cfg.faces.backend}", "version": self.faces.version}
        if cfg.phash:
            from mmloom.models import package_version

            for c in ("phash", "phash_int"):
                self.meta[c] = {"model": "imagehash.phash (64-bit DCT)", "version": package_version("imagehash")}

    @staticmethod
    def _require(value, key: str, what: str) -> None:
        if not value:
            from mmloom.errors import UserError

            raise UserError(f"{key} is not set: give the path or hub id of {what}, or switch the backend to none")

    def _nudenet(self):
        if self.nudenet is None:
            from mmloom.filters.nsfw import NudeNet

            self.nudenet = NudeNet()
        return self.nudenet

    def _embedder(self, ref: str):
        if ref not in self.embedders:
            from mmloom.clip import ClipEmbedder

            self.embedders[ref] = ClipEmbedder(ref, self.device, self.cfg.precision)
        return self.embedders[ref]

    def columns(self) -> list[str]:
        cols = [c for c in COLUMN_TYPES if c in self.meta]
        if not self.cfg.clip.store_embeddings:
            cols = [c for c in cols if not c.endswith("_embedding")]
        return cols

    def score(self, images, captions: list[str | None]) -> dict[str, list]:
        """Score one batch of PIL images (RGB) with their raw captions."""
        out: dict[str, list] = {c: [] for c in self.columns()}
        for im, cap in zip(images, captions):
            for k, v in geometry(im).items():
                out[k].append(v)
            clean, reason = clean_caption(cap)
            out["clean_caption"].append(clean)
            out["caption_reason"].append(reason)
            if "phash" in out:
                hx, iv = phash(im)
                out["phash"].append(hx)
                out["phash_int"].append(iv)
        # one encode per CLIP model per batch
        img_emb = {ref: e.images(images) for ref, e in self.embedders.items()}
        main = self.cfg.clip.model
        txt = self.embedders[main].texts([c or "" for c in captions])  # raw captions, as LAION scored them
        out["clip_score"] = (img_emb[main] * txt).sum(-1).tolist()
        if self.cfg.clip.store_embeddings:
            out["clip_image_embedding"] = img_emb[main].tolist()
            out["clip_text_embedding"] = txt.tolist()
        dets = self.nudenet.detect(images) if self.nudenet else None
        if self.nsfw:
            out["nsfw"] = self.nsfw(images, img_emb.get(getattr(self.nsfw, "needs_clip", None)), dets)
        if self.watermark:
            out["watermark"] = self.watermark(images)
        if self.aesthetic:
            out["aesthetic"] = self.aesthetic(images, img_emb[self.aesthetic.needs_clip])
        if self.faces:
            boxes = self.faces(images, dets)
            out["face_boxes"] = boxes
            out["face_count"] = [len(b) for b in boxes]
        return out
