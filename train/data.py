"""final/ shards -> training batches, with the plain webdataset library.

Shards are split by node and by DataLoader worker (webdataset's own mechanism), shuffled,
and resampled for endless epochs; samples are shuffled in a buffer. A sample that fails
to decode is logged with its key and skipped, and counted. Each sample's random choices
(prompt rules, weighting) come from a generator seeded by (seed, sample index), and a
resumed run skips the samples it has already consumed before decoding them, so training
picks up exactly where it stopped.

Shards are data from strangers, so no byte of them chooses code. Only the members the
build stage writes are read, each with its own decoder (``MEMBERS``): images through the
download stage's header check (``mmloom.imageguard``: format allow-list, pixel count
before decoding), JSON, UTF-8 text and ``.npy`` without pickles. Any other member
(``.pickle``, ``.pyd``, ``.pth`` ... which webdataset's default decoders would unpickle)
is dropped unread and counted. A dataset directory trains only on the shards whose build
completion record's sha256 matches; tars named directly are used with a warning.
webdataset opens ``pipe:`` URLs (and, through curl or gsutil, a few other schemes) by
running a shell command: refused unless ``data.allow_pipe`` / ``--allow-pipe``;
http(s) and gs go through fsspec instead, without a shell.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
from collections import Counter
from urllib.parse import urlsplit

import braceexpand
import fsspec
import torch

from mmloom.errors import UserError
from .config import DataConfig
from .prompts import PromptBuilder, resolve_segments, square

log = logging.getLogger("mmloom.train.data")


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset opener for object-store and http URLs (s3://, gcs://, https://, ...) through fsspec."""
    return fsspec.open(url, mode).open()


def _gopen_schemes() -> dict:
    import importlib

    return importlib.import_module("webdataset.gopen").gopen_schemes  # the module, not its gopen()


def runs_a_shell(scheme: str) -> bool:
    """Whether webdataset opens ``scheme:`` URLs by running a shell command (pipe:, and
    curl/gsutil/ais command lines with the URL pasted in)."""
    handler = _gopen_schemes().get(scheme)
    return (handler is not None and getattr(handler, "__module__", "") == "webdataset.gopen"
            and handler.__name__ not in ("gopen_file", "gopen_error"))


def register_fsspec_schemes(urls: list[str]) -> None:
    """Let webdataset open the URLs' schemes that it has no opener for (s3 among them)."""
    schemes = _gopen_schemes()
    for u in urls:
        proto = urlsplit(u).scheme if "://" in u else ""
        if proto and proto not in schemes:
            schemes[proto] = _fsspec_open


# object stores that DataLoader worker processes (spawned ones too) can open
register_fsspec_schemes(["s3://", "s3a://", "gcs://", "abfs://", "az://"])
# webdataset runs `curl '<url>'` / `gsutil cat '<url>'` in a shell for these: a quote in the
# URL would run code. fsspec reads them without a shell.
_gopen_schemes().update({"http": _fsspec_open, "https": _fsspec_open, "gs": _fsspec_open})


def _refuse_shell(url: str, allow_pipe: bool) -> None:
    scheme = urlsplit(url).scheme
    if not allow_pipe and runs_a_shell(scheme):
        raise UserError(f"data.shards {url!r}: webdataset opens {scheme}: URLs by running a shell command; "
                        "mmloom refuses that unless you pass --allow-pipe (data.allow_pipe: true). "
                        "Object stores and http(s) work without it (s3://, gs://, https://)")


def sha256_of(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verified_shards(root: str) -> list[str]:
    """The final/ tars of dataset directory ``root`` that the build stage committed and
    that still hash to their completion record. A tar without a record (not committed:
    a build still running or crashed, or a file dropped in) is skipped with a warning; a
    committed tar whose bytes changed is a UserError naming it."""
    from ..manifests.store import ShardStore, shard_name

    store = ShardStore(root)
    urls, unrecorded = [], []
    for p in sorted(store.fs.glob(store.path("final", "*.tar"))):
        name = p.rsplit("/", 1)[-1]
        stem = name[:-len(".tar")]
        rec = store.record("build", int(stem)) if stem.isdigit() and shard_name(int(stem)) == stem else None
        entry = (rec or {}).get("files", {}).get(f"final/{name}")
        if not entry:
            unrecorded.append(name)
            continue
        record = store.url("_commits", "build", f"{stem}.json")
        size = store.fs.size(p)
        digest = sha256_of(store.fs, p) if size == entry["bytes"] else None
        if digest != entry["sha256"]:
            got = f"sha256 {digest}" if digest else f"{size} bytes"
            raise UserError(f"{store.url('final', name)}: {got} does not match its completion record {record} "
                            f"(sha256 {entry['sha256']}, {entry['bytes']} bytes): the shard changed after the build "
                            f"stage wrote it; rebuild it (`mmloom build {root}`) or remove it and its record")
        urls.append(store.url("final", name))
    if unrecorded:
        log.warning("%s: skipping %d final/ tar(s) with no completion record (not committed by the build stage): %s%s",
                    root, len(unrecorded), ", ".join(unrecorded[:5]), " ..." if len(unrecorded) > 5 else "")
    if not urls:
        raise UserError(f"{root}: no final/ shard with a matching completion record (_commits/build/NNNNN.json); "
                        f"run `mmloom build {root}`, or name the tars (e.g. {root}/final/*.tar) to train on them unverified")
    return urls


def shard_urls(spec: str, allow_pipe: bool = False, key: str = "data.shards") -> list[str]:
    """A dataset directory, a glob or a brace pattern -> tar URLs (local or fsspec URLs).

    A dataset directory (or its final/ folder) yields only its verified shards
    (``verified_shards``); tars named by a glob, a pattern or a plain folder are used as
    they are, with one warning. Shell-run URLs (``pipe:`` ...) need ``allow_pipe``."""
    if not spec:
        raise UserError("data.shards is empty: give a dataset directory, a glob or a brace pattern of final/ tars")
    scheme = urlsplit(spec).scheme
    _refuse_shell(spec, allow_pipe)
    if runs_a_shell(scheme) or scheme in ("http", "https") or "{" in spec:  # patterns webdataset opens itself
        urls = list(braceexpand.braceexpand(spec))
    else:
        fs, path = fsspec.core.url_to_fs(spec)
        name = fs.unstrip_protocol if "://" in spec else (lambda p: p)
        if not any(c in path for c in "*?[") and not fs.exists(path):
            raise UserError(f"{key} {spec!r} does not exist (give a dataset directory, a glob or a brace pattern of final/ tars)")
        if fs.isdir(path):
            d = path.rstrip("/")
            if fs.isdir(d + "/final"):
                return _register(verified_shards(spec.rstrip("/")))
            if d.endswith("/final") and fs.isdir(d[:-len("/final")] + "/_commits"):
                return _register(verified_shards(spec.rstrip("/")[:-len("/final")]))
            urls = sorted(name(p) for p in fs.glob(d + "/*.tar"))
        else:
            urls = sorted(name(p) for p in fs.glob(path))
    if not urls:
        raise UserError(f"{key} {spec!r} matches no tar file")
    for u in urls:
        _refuse_shell(u, allow_pipe)
    log.warning("data.shards %r names %d tar file(s) directly: unverified (no build completion record is checked); "
                "only the members mmloom writes are decoded", spec, len(urls))
    return _register(urls)


def _register(urls: list[str]) -> list[str]:
    register_fsspec_schemes(urls)
    return urls


# ---------------------------------------------------------------- members and decoders
IMAGE, TEXT, JSON, NPY = "image", "text", "json", "npy"
# what curate/build.py writes per sample; the main image in download.encode_format
MEMBERS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"jpg|png|webp"), IMAGE),
    (re.compile(r"crops\.jpg"), IMAGE),  # every crop of the sample, rectangles in prompt.json
    (re.compile(r"crop\d+(?:_head)?\.jpg"), IMAGE),  # shards built before crops.jpg
    (re.compile(r"txt|raw\.txt"), TEXT),
    (re.compile(r"json|prompt\.json|scores\.json"), JSON),
    (re.compile(r"clip_image\.npy"), NPY),
]


def member_kind(suffix: str) -> str | None:
    """The decoder for a member suffix (``crop0.jpg``, ``prompt.json``), or None: not ours."""
    for pattern, kind in MEMBERS:
        if pattern.fullmatch(suffix):
            return kind
    return None


def _npy(data: bytes):
    """A .npy array of plain numbers: header parsed, its size checked against the bytes
    present, no pickle (object arrays are refused), no allocation beyond the member."""
    import numpy as np
    from numpy.lib import format as npf

    f = io.BytesIO(data)
    version = npf.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version} is not supported")
    read = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise ValueError(".npy holds Python objects (a pickle): refused")
    n = 1
    for d in shape:
        n *= int(d)
    body = data[f.tell():]
    if len(body) != n * dtype.itemsize:
        raise ValueError(f".npy declares shape {shape} of {dtype} ({n * dtype.itemsize} bytes) but holds {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def decode_member(suffix: str, data: bytes, max_pixels: int, least: int | None = None):
    """Decode one member with its own decoder; None for a member mmloom does not write.
    ``least``: an image is used at most this small (a JPEG decodes at reduced scale)."""
    kind = member_kind(suffix)
    if kind == IMAGE:
        from mmloom.imageguard import open_image

        return open_image(data, max_pixels, least=least)
    if kind == TEXT:
        return bytes(data).decode("utf-8")
    if kind == JSON:
        return json.loads(data)
    if kind == NPY:
        return _npy(bytes(data))
    return None


def _split(fname: str) -> tuple[str | None, str]:
    from webdataset.tariterators import base_plus_ext

    prefix, suffix = base_plus_ext(fname)
    return prefix, (suffix or "").lower()  # as webdataset groups them


class MemberCounter:
    """Tar member filter: keep mmloom's members (or only ``only``), drop the rest unread, count them."""

    LOGGED = 20

    def __init__(self, only: set[str] | None = None):
        self.only = only
        self.count = 0
        self.by_suffix: Counter = Counter()

    def keep(self, url: str, fname: str) -> bool:
        prefix, suffix = _split(fname)
        if prefix is None:
            return False  # no KEY.ext: webdataset would ignore it too
        if member_kind(suffix) is not None and (self.only is None or suffix in self.only):
            return True
        if self.only is None:
            self.count += 1
            self.by_suffix[suffix] += 1
            if self.count <= self.LOGGED:
                log.warning("dropped tar member %s of %s: not a member mmloom writes, never decoded (%d so far%s)",
                            fname, url, self.count, "; further ones are counted only" if self.count == self.LOGGED else "")
        return False


def tar_members(fileobj, url: str, keep, max_bytes: int, handler):
    """webdataset's tar_file_iterator, plus a size bound: each kept regular member's size
    is read from its tar header and a member above ``max_bytes`` is skipped unread
    (reported to ``handler``), so a huge or decompression-bomb member never fills memory."""
    import tarfile

    stream = tarfile.open(fileobj=fileobj, mode="r|*")
    for info in stream:
        try:
            if not info.isreg() or not info.name or info.name.startswith("__") or not keep(info.name):
                continue
            if info.size > max_bytes:
                raise ValueError(f"{url}: member {info.name} is {info.size} bytes, above data.max_member_bytes {max_bytes}; skipped unread")
            yield {"fname": info.name, "data": stream.extractfile(info).read()}
        except Exception as exn:  # noqa: BLE001 - the handler decides, as in webdataset
            if not handler(exn):
                return
        finally:
            stream.members = []


class _TarSamples:
    """webdataset's tarfile_to_samples, with the member filter told which shard it reads."""

    def __init__(self, handler, members: MemberCounter, max_member_bytes: int = DataConfig.model_fields["max_member_bytes"].default):
        self.handler, self.members, self.max_member_bytes = handler, members, max_member_bytes

    def __call__(self, src):
        from webdataset.tariterators import group_by_keys, url_opener

        def files():
            for source in url_opener(src, handler=self.handler):
                url = source["url"]
                try:
                    for f in tar_members(source["stream"], url, lambda n, url=url: self.members.keep(url, n),
                                         self.max_member_bytes, self.handler):
                        f["__url__"] = url
                        yield f
                except Exception as exn:  # noqa: BLE001 - the handler decides, as in webdataset
                    if not self.handler(exn):
                        return
                yield {}  # end of shard: no sample spans two shards

        return group_by_keys(files(), handler=self.handler)


class RejectedMember(ValueError):
    pass


class SafeDecoder:
    """Decode every member of a sample with ``decode_member``; a member that fails
    rejects the sample with a reason naming shard, key and member."""

    def __init__(self, max_pixels: int, least: dict[str, int] | None = None):
        self.max_pixels = max_pixels
        self.least = least or {}  # member suffix -> the smallest side it is used at

    def __call__(self, sample: dict) -> dict:
        out = {k: v for k, v in sample.items() if k.startswith("__")}
        for k, v in sample.items():
            if k.startswith("__"):
                continue
            try:
                value = decode_member(k, v, self.max_pixels, self.least.get(k))
            except Exception as e:  # noqa: BLE001 - ImageRejected, Pillow's DecompressionBombError, bad JSON ...
                raise RejectedMember(f"{sample.get('__url__')}: {sample.get('__key__')}.{k}: {e}") from None
            if value is not None:
                out[k] = value
        return out


def read_members(urls: list[str], only: set[str], max_pixels: int = DataConfig.model_fields["max_pixels"].default):
    """Decoded samples holding only the members ``only`` (e.g. ``{"clip_image.npy"}``), in
    shard order, for passes over the data outside training; errors are raised."""
    import webdataset as wds

    decode = SafeDecoder(max_pixels)
    for s in wds.DataPipeline(wds.SimpleShardList(urls), _TarSamples(wds.reraise_exception, MemberCounter(only))):
        yield decode(s)


class CorruptCounter:
    """webdataset handler: log and skip a broken sample, and count it."""

    KEPT = 100

    def __init__(self):
        self.count = 0
        self.reasons: list[str] = []  # the first KEPT, for the log and tests

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        if len(self.reasons) < self.KEPT:
            self.reasons.append(str(exn))
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


def make_dataset(cfg: DataConfig, builder: PromptBuilder, seed: int, skip: int = 0, counter: CorruptCounter | None = None,
                 urls: list[str] | None = None):
    import webdataset as wds

    urls = urls or shard_urls(cfg.shards, cfg.allow_pipe)
    counter = counter or CorruptCounter()
    members = MemberCounter()
    stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)] if cfg.resampled else [
        wds.SimpleShardList(urls, seed=seed), wds.split_by_node, wds.split_by_worker]
    pc = getattr(builder, "cfg", None)
    main_side = max(cfg.resolution, pc.crop_size if getattr(pc, "structure", False) else 0)
    stages += [
        _TarSamples(counter, members, cfg.max_member_bytes),
        wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=random.Random(seed)),
        _Skip(skip),
        # never webdataset's default decoders; the main image is only used squared to the
        # training resolution (and for the structure prompt's edges at the crop size)
        wds.map(SafeDecoder(cfg.max_pixels, {ext: main_side for ext in ("jpg", "png", "webp")}), handler=counter),
        wds.map(lambda s: _to_example(s, builder, seed, cfg), handler=counter),
        wds.select(lambda ex: ex is not None),
    ]
    ds = wds.DataPipeline(*stages)
    ds.corrupt = counter
    ds.members = members
    return ds


def _to_example(sample: dict, builder: PromptBuilder, seed: int, cfg: DataConfig):
    rng = random.Random(f"{seed}/{sample['__index__']}")
    weight = float(sample.get("json", {}).get("weight", 1.0))
    if cfg.use_weights and rng.random() > weight / max(weight, cfg.max_weight):
        return None  # favour weighted (people) samples: weight 1 is kept 1/max_weight as often
    main = next((sample[k] for k in ("jpg", "png", "webp") if k in sample), None)  # download.encode_format
    if main is None:
        raise ValueError(f"{sample.get('__url__')}: {sample['__key__']} has no image member (jpg, png or webp)")
    image = square(main, cfg.resolution)
    pixels = torch.from_numpy(__import__("numpy").asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    emb = sample.get("clip_image.npy")
    prompt = builder(sample, rng)
    segments = [{k: v for k, v in s.items() if k not in ("image", "head")} for s in resolve_segments(sample)]
    return {"pixels": pixels, "prompt": prompt, "key": sample["__key__"], "index": sample["__index__"],
            "caption": sample.get("txt", ""), "segments": segments,
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


def make_loader(cfg: DataConfig, builder: PromptBuilder, batch_size: int, seed: int, skip: int = 0,
                urls: list[str] | None = None):
    ds = make_dataset(cfg, builder, seed, skip, urls=urls)
    # its own generator: creating the iterator must not draw from the global RNG that a
    # resumed run has just restored
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(seed))
    if cfg.num_workers == 0 and cfg.prefetch > 0:
        loader = Ahead(loader, cfg.prefetch)
    return loader, ds


class Ahead:
    """Batches of ``loader`` made by a background thread up to ``depth`` ahead of the
    training step, in the same order (the pipeline's randomness is seeded per sample, so
    the batches are the ones made in turn): decoding overlaps with the step, which leaves
    the GIL in torch's kernels, without worker processes (exact resume stays as with
    ``num_workers`` 0). An error in the thread is raised by ``next`` in the caller; an
    iterator that is dropped stops its thread."""

    def __init__(self, loader, depth: int = 2):
        self.loader, self.depth = loader, depth

    def __iter__(self):
        return _AheadIter(iter(self.loader), self.depth)


class _AheadIter:
    _END = object()

    def __init__(self, it, depth: int):
        import queue
        import threading
        import weakref

        self.q: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        thread = threading.Thread(target=_AheadIter._fill, args=(it, self.q, self.stop), daemon=True,
                                  name="mmloom-data-ahead")
        thread.start()
        weakref.finalize(self, self.stop.set)  # dropped: the thread ends at its next batch

    @staticmethod
    def _fill(it, q, stop) -> None:
        import queue

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for batch in it:
                if not put((batch, None)):
                    return
        except BaseException as e:  # noqa: BLE001  (raised again in the training thread)
            put((None, e))
            return
        put((_AheadIter._END, None))

    def __iter__(self):
        return self

    def __next__(self):
        batch, err = self.q.get()
        if err is not None:
            self.stop.set()
            raise err
        if batch is _AheadIter._END:
            self.stop.set()
            raise StopIteration
        return batch
