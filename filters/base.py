"""The Scorer protocol: what the score stage asks of every scorer and detector here.

A scorer adds columns to ``scores/``. It declares them with their Arrow types
(``columns``), names the model and version that produced each one (``meta``, written
into the column's parquet field metadata), and computes them for one batch of images
with their raw captions (``score``), one value per image and column.

Several scorers read the same model pass: the clip score, the NSFW MLP head and the
aesthetic head read an open_clip model's image embeddings, the NSFW score and the face
count read nudenet's detections. Each such pass runs once per batch: a scorer names the
open_clip model it reads (``needs_clip``) and takes the pass from the `Batch`, which
computes it the first time it is asked. `filters.scoring.ScoreSet` builds the scorers
the config asks for, loads each open_clip model once and iterates over the scorers.
Nothing in ``filters/`` knows about Ray, shards, files or the pipeline config.

A batch's work comes in two halves, so that the score stage can make batch i+1 ready in
a worker thread while the models run batch i: the CPU work that touches no model
(resizing and normalizing into each model's input tensors, tokenizing the captions,
nudenet's letterboxing, geometry, caption cleaning, hashes) is kept in the batch by `Batch.ready`, and a scorer
may do its share of it ahead in an optional ``prepare(batch)``; the model passes are
kept by `Batch.once`. `Batch.again` is the same prepared batch without its model passes.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import pyarrow as pa

PROBABILITY = pa.float32()  # a score in [0, 1]


class Batch:
    """One batch: PIL images (RGB) with their raw captions, and the model passes that
    several scorers share, each computed once (`clip_images`, `detections`)."""

    def __init__(self, images, captions, embedders: dict | None = None, prepared: dict | None = None):
        self.images = list(images)
        self.captions = list(captions)
        self.embedders = embedders or {}  # open_clip ref -> mmloom.clip.ClipEmbedder
        self.prepared: dict[Any, Any] = {} if prepared is None else prepared  # CPU work (`ready`)
        self._done: dict[Any, Any] = {}  # model passes (`once`)

    def __len__(self) -> int:
        return len(self.images)

    def once(self, key, compute: Callable[[], Any]):
        """``compute()`` the first time ``key`` is asked for in this batch, then its result."""
        if key not in self._done:
            self._done[key] = compute()
        return self._done[key]

    def ready(self, key, compute: Callable[[], Any]):
        """As `once`, for CPU work that touches no model (kept by `again`)."""
        if key not in self.prepared:
            self.prepared[key] = compute()
        return self.prepared[key]

    def again(self) -> "Batch":
        """This batch with its prepared CPU work and without any model pass."""
        return Batch(self.images, self.captions, self.embedders, self.prepared)

    def uploaded(self, device):
        """The images as uint8 tensors on ``device``, one per size
        (`mmloom.pil_resample.upload`), copied there once for every model that resizes there."""
        from mmloom.pil_resample import upload

        return self.ready(("upload", str(device)), lambda: upload(self.images, device))

    def clip_inputs(self, ref: str):
        """The input of the open_clip model ``ref``'s image tower, as pixels
        (`mmloom.clip.ClipEmbedder.pixels`: uint8, normalized where the model runs)."""
        emb = self.embedders[ref]
        return self.ready(("clip", ref), lambda: emb.pixels(self.images, lambda: self.uploaded(emb.device)))

    def clip_raw(self, ref: str):
        """[N, D] raw image embeddings of the open_clip model ``ref`` (one model pass)."""
        return self.once(("clip", ref), lambda: self.embedders[ref].images(self.clip_inputs(ref), normalize=False))

    def clip_images(self, ref: str):
        """[N, D] normalized image embeddings of the open_clip model ``ref``."""
        import torch

        return self.once(("clip-unit", ref), lambda: torch.nn.functional.normalize(self.clip_raw(ref), dim=-1))

    def clip_tokens(self, ref: str):
        """The raw captions as the open_clip model ``ref``'s input ids
        (`mmloom.clip.ClipEmbedder.tokens`; a missing caption reads as "")."""
        return self.ready(("clip-tokens", ref), lambda: self.embedders[ref].tokens(self.captions))

    def nudenet_inputs(self, nudenet):
        """nudenet's letterboxed input of each image (`filters.nsfw.NudeNet.inputs`)."""
        return self.ready(("nudenet", id(nudenet)), lambda: nudenet.inputs(self.images))

    def detections(self, nudenet) -> list[list[dict]]:
        """nudenet's detections per image (`filters.nsfw.NudeNet`), one ONNX call per batch."""
        return self.once(("nudenet", id(nudenet)), lambda: nudenet.detect_inputs(self.nudenet_inputs(nudenet)))


@runtime_checkable
class Scorer(Protocol):
    """A scorer or detector as the score stage runs it."""

    columns: dict[str, pa.DataType]  # the columns it adds, in order, with their Arrow types
    meta: dict[str, dict[str, str]]  # per column: {"model": ..., "version": ...}
    needs_clip: str | None  # the open_clip model whose image embeddings it reads, if any

    def score(self, batch: Batch) -> dict[str, list]:
        """One list per column of ``columns``, one value per image of ``batch``."""
        ...

    # optional: ``prepare(batch) -> None``, the CPU work of ``score`` that touches no
    # model, done ahead and kept in the batch with `Batch.ready` (run in a worker thread)
