"""final/ shards -> training batches, with the plain webdataset library.

Shards are split by node and by DataLoader worker (webdataset's own mechanism), shuffled,
and resampled for endless epochs; samples are shuffled in a buffer. A sample that fails
to decode is logged with its key and skipped, and counted. Each sample's random choices
(prompt rules, weighting) come from a generator seeded by (seed, sample index), and a
resumed run skips the samples it has already consumed before decoding them, so training
picks up exactly where it stopped.
"""

from __future__ import annotations

import logging
import random

import braceexpand
import fsspec
import torch

from mmloom.errors import UserError
from mmloom.train.config import DataConfig
from mmloom.train.prompts import PromptBuilder, square

log = logging.getLogger("mmloom.train.data")


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset opener for object-store URLs (s3://, gcs://, ...) through fsspec."""
    return fsspec.open(url, mode).open()


def register_fsspec_schemes(urls: list[str]) -> None:
    """Let webdataset open the URLs' schemes that it has no opener for (s3 among them)."""
    import importlib

    schemes = importlib.import_module("webdataset.gopen").gopen_schemes  # the module, not its gopen()
    for u in urls:
        proto = u.split("://", 1)[0] if "://" in u else None
        if proto and proto not in schemes:
            schemes[proto] = _fsspec_open


# object stores that DataLoader worker processes (spawned ones too) can open
register_fsspec_schemes(["s3://", "s3a://", "gcs://", "abfs://", "az://"])


def shard_urls(spec: str) -> list[str]:
    """A dataset directory, a glob or a brace pattern -> tar URLs (local or fsspec URLs)."""
    if not spec:
        raise UserError("data.shards is empty: give a dataset directory, a glob or a brace pattern of final/ tars")
    if spec.startswith(("pipe:", "http://", "https://")) or "{" in spec:  # patterns webdataset opens itself
        urls = list(braceexpand.braceexpand(spec))
    else:
        fs, path = fsspec.core.url_to_fs(spec)
        name = fs.unstrip_protocol if "://" in spec else (lambda p: p)
        if fs.isdir(path):
            d = path.rstrip("/") + "/final" if fs.isdir(path.rstrip("/") + "/final") else path
            urls = sorted(name(p) for p in fs.glob(d.rstrip("/") + "/*.tar"))
        else:
            urls = sorted(name(p) for p in fs.glob(path))
    if not urls:
        raise UserError(f"data.shards {spec!r} matches no tar file")
    register_fsspec_schemes(urls)
    return urls


class CorruptCounter:
    """webdataset handler: log and skip a broken sample, and count it."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipping corrupt sample (%d so far): %s", self.count, exn)
        return True


class _Skip:
    """Drop the first ``n`` raw samples of the stream (already consumed before a resume)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, src):
        for i, s in enumerate(src):
            if i >= self.n:
                s["__index__"] = i
                yield s


def make_dataset(cfg: DataConfig, builder: PromptBuilder, seed: int, skip: int = 0, counter: CorruptCounter | None = None):
    import webdataset as wds

    urls = shard_urls(cfg.shards)
    counter = counter or CorruptCounter()
    stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)] if cfg.resampled else [
        wds.SimpleShardList(urls, seed=seed), wds.split_by_node, wds.split_by_worker]
    stages += [
        wds.tarfile_to_samples(handler=counter),
        wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=random.Random(seed)),
        _Skip(skip),
        wds.decode("pil", handler=counter),
        wds.map(lambda s: _to_example(s, builder, seed, cfg), handler=counter),
        wds.select(lambda ex: ex is not None),
    ]
    ds = wds.DataPipeline(*stages)
    ds.corrupt = counter
    return ds


def _to_example(sample: dict, builder: PromptBuilder, seed: int, cfg: DataConfig):
    rng = random.Random(f"{seed}/{sample['__index__']}")
    weight = float(sample.get("json", {}).get("weight", 1.0))
    if cfg.use_weights and rng.random() > weight / max(weight, cfg.max_weight):
        return None  # favour weighted (people) samples: weight 1 is kept 1/max_weight as often
    image = square(sample["jpg"], cfg.resolution)
    pixels = torch.from_numpy(__import__("numpy").asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    emb = sample.get("clip_image.npy")
    return {"pixels": pixels, "prompt": builder(sample, rng), "key": sample["__key__"], "index": sample["__index__"],
            "caption": sample.get("txt", ""), "segments": sample.get("prompt.json", {}).get("segments", []),
            "clip_image": None if emb is None else torch.from_numpy(emb.astype("float32"))}


def collate(examples: list[dict]) -> dict:
    return {
        "pixels": torch.stack([e["pixels"] for e in examples]),
        "prompts": [e["prompt"] for e in examples],
        "keys": [e["key"] for e in examples],
        "captions": [e["caption"] for e in examples],
        "segments": [e["segments"] for e in examples],
        # the stored CLIP image embeddings, when every sample of the batch has one
        "clip_image": torch.stack([e["clip_image"] for e in examples]) if all(e["clip_image"] is not None for e in examples) else None,
        "last_index": max(e["index"] for e in examples),
    }


def make_loader(cfg: DataConfig, builder: PromptBuilder, batch_size: int, seed: int, skip: int = 0):
    ds = make_dataset(cfg, builder, seed, skip)
    # its own generator: creating the iterator must not draw from the global RNG that a
    # resumed run has just restored
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(seed))
    return loader, ds
