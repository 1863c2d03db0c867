"""`mmloom score`: downloaded shards -> scores/ parquet, one column per measurement.

Scoring runs in Ray actors that load their models once (`runner.run_shards_on_actors`);
each actor takes a committed download shard, scores its images in batches and commits
``scores/NNNNN.parquet`` keyed by sample key. Rows are never dropped: an image that does
not decode gets a row with ``score_error``. Each column's parquet field metadata names
the model and version that produced it.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from .config import DownloadConfig, PipelineConfig, ScoreConfig
from .runner import Resources
from .stage import Actors, ActorWorker, Stage, run_stage
from mmloom import imageguard
from mmloom.errors import UserError
from ..manifests import schemas as S
from ..manifests.store import CorruptFile, ShardStore, shard_name

STAGE = "score"
DEFAULT_MAX_PIXELS = DownloadConfig.model_fields["max_pixels"].default  # download.max_pixels
OUT_DIR = S.STAGE_DIRS[STAGE]


def download_tar(shard: int) -> str:
    """A download shard's tar, relative to the dataset root."""
    return f"{S.STAGE_DIRS['download']}/{shard_name(shard)}.tar"


def read_images(store: ShardStore, shard: int, ext: str = "jpg") -> dict[str, bytes]:
    """key -> encoded image bytes of one committed download tar (any filesystem), checked
    against the sha256 in its completion record first; errors name the tar."""
    rel = download_tar(shard)
    data = store.read_verified("download", shard, rel)
    out = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            for m in t.getmembers():
                stem, _, e = m.name.rpartition(".")
                if e == ext and m.isfile():
                    out[stem] = t.extractfile(m).read()
    except tarfile.TarError as e:
        raise CorruptFile(store.url(rel), f"unreadable tar ({e})") from None
    return out


def decode_member(store: ShardStore, shard: int, blobs: dict[str, bytes], key: str, ext: str, max_pixels: int):
    """One image of a committed download tar as RGB, through the header check
    (`imageguard.decode_rgb`); a refusal names the tar and the member. For the stages
    after score (ground, build), which see only images that score decoded, so a refusal
    there is an inconsistent dataset, not a per-image result."""
    try:
        return imageguard.decode_rgb(blobs[key], max_pixels)
    except imageguard.ImageRejected as e:
        raise UserError(f"{store.url(download_tar(shard))}: member {key}.{ext}: {e}") from None


def download_rows(store: ShardStore, shard: int, blobs: dict[str, bytes], ext: str) -> list[dict]:
    """The successful rows of a committed download shard; every one must have its image
    in the tar, else the shard is inconsistent (never recorded as a per-image error,
    which would be permanent)."""
    rel = f"{S.STAGE_DIRS['download']}/{shard_name(shard)}.parquet"
    rows = [r for r in store.read_table_verified("download", shard, rel).to_pylist() if r["status"] == S.SUCCESS]
    missing = [r["key"] for r in rows if r["key"] not in blobs]
    if missing:
        raise CorruptFile(store.url(rel), f"lists {len(missing)} successful image(s) that its tar lacks "
                                          f"(first: {missing[0]}.{ext})")
    return rows


def score_shard(scorers, shard: int, root: str, chash: str, encode_format: str = "jpg", prefetch: int | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Score one committed download shard with a built `ScoreSet` and commit it.

    With the models on a GPU, worker threads (``prefetch``; default torch's CPU threads,
    at most 4) decode the next batches and make them ready for the models
    (`ScoreSet.prepare`) while the models run the current one, so decoding and
    preprocessing stay off the GPU's critical path. With the models on the CPU they
    already keep every core busy and a worker thread buys nothing (bench/score.py
    measures both): the default there is 0, decoding in turn with the models.
    ``max_pixels``: an image whose header promises more pixels is not decoded (the
    download stage's ``max_pixels``; a shard may come from anywhere)."""
    from ..filters.scoring import COLUMN_TYPES

    store = ShardStore(root)
    blobs = read_images(store, shard, encode_format)
    rows = download_rows(store, shard, blobs, encode_format)
    cols = scorers.columns()
    table: dict[str, list] = {c: [] for c in ["sample_key", "key", "original_width", "original_height", *cols, "score_error"]}
    bs = scorers.cfg.batch_size

    def ready(batch: list[dict]):
        """Decode one batch and prepare it for the models (runs in a worker thread)."""
        images, ok_rows, errors = [], [], []
        for r in batch:
            try:
                images.append(imageguard.decode_rgb(blobs[r["key"]], max_pixels))
                ok_rows.append(r)
            except Exception as e:  # recorded, never dropped
                errors.append((r, f"cannot decode image {r['key']}.{encode_format}: {type(e).__name__}: {e}"))
        return ok_rows, errors, (scorers.prepare(images, [r["caption"] for r in ok_rows]) if images else None)

    batches = [rows[i:i + bs] for i in range(0, len(rows), bs)]
    with contextlib.closing(ahead(ready, batches, prefetch_threads(scorers.device, prefetch))) as prepared:
        for ok_rows, errors, batch in prepared:
            for r, err in errors:
                for c in cols:
                    table[c].append(None)
                _base_cols(table, r, err)
            if ok_rows:
                scores = scorers.score(batch, [r["caption"] for r in ok_rows])
                for j, r in enumerate(ok_rows):
                    for c in cols:
                        table[c].append(scores[c][j])
                    _base_cols(table, r, None)
    fields = [pa.field("sample_key", pa.string()), pa.field("key", pa.string()),
              pa.field("original_width", pa.int32()), pa.field("original_height", pa.int32())]
    for c in cols:
        meta = {k.encode(): str(v).encode() for k, v in scorers.meta[c].items()}
        fields.append(pa.field(c, COLUMN_TYPES[c], metadata=meta))
    fields.append(pa.field("score_error", pa.string()))
    t = pa.Table.from_pydict(table, schema=pa.schema(fields))
    staging = store.staging_dir(OUT_DIR, shard)
    out = os.path.join(staging, "scores.parquet")
    pq.write_table(t, out)
    store.commit(STAGE, shard, {f"{OUT_DIR}/{shard_name(shard)}.parquet": out},
                 {"rows": t.num_rows, "errors": sum(e is not None for e in table["score_error"])}, chash)
    store.discard(staging)
    return {"rows": t.num_rows}


def prefetch_threads(device: str, prefetch: int | None) -> int:
    """Worker threads that make batches ready ahead of the models: ``prefetch`` when given,
    else torch's CPU threads (at most 4) with the models on a GPU and 0 on the CPU. Four,
    not more: on an H200 with 16 cores (2026-11-29, `bash bench/gpu.sh --score-threads`)
    the ViT-L/14 score stage ran at 514 and 649 images/s with 4 threads, 458 and 577 with
    8 and 482 and 555 with 16, in two runs: past four, threads wait on Python's lock and
    slow the thread that drives the GPU more than they add."""
    if prefetch is not None:
        return max(0, int(prefetch))
    if not str(device).startswith("cuda"):
        return 0
    import torch

    return max(1, min(4, torch.get_num_threads()))


def ahead(fn, items: list, threads: int):
    """``fn(item)`` for each item, yielded in order, computed by ``threads`` worker threads
    at most ``threads + 1`` items ahead (``threads=0``: in the caller's thread, in turn).
    Closing the generator (an error in the consumer) cancels what has not started."""
    if threads <= 0:
        for x in items:
            yield fn(x)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    ex = ThreadPoolExecutor(threads, thread_name_prefix="mmloom-prefetch")
    todo, pending = iter(items), deque()
    try:
        for x in todo:
            pending.append(ex.submit(fn, x))
            if len(pending) > threads:
                break
        while pending:
            f = pending.popleft()
            nxt = next(todo, _END)
            if nxt is not _END:
                pending.append(ex.submit(fn, nxt))
            yield f.result()
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


_END = object()


def _base_cols(table: dict, r: dict, error: str | None) -> None:
    table["sample_key"].append(r["sample_key"])
    table["key"].append(r["key"])
    table["original_width"].append(r["original_width"])
    table["original_height"].append(r["original_height"])
    table["score_error"].append(error)


class ScoreWorker(ActorWorker):
    """What one Ray actor holds: every scoring model, loaded once."""

    def __init__(self, cfg: dict):
        from ..filters.scoring import ScoreSet

        self.scorers = ScoreSet(ScoreConfig.model_validate(cfg))

    def run(self, shard: int, root: str, chash: str, encode_format: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
        return score_shard(self.scorers, shard, root, chash, encode_format, max_pixels=max_pixels)


def _shards(store: ShardStore, config: PipelineConfig) -> list[int]:
    downloaded = store.committed_shards("download")
    if not downloaded:
        raise UserError(f"{store.root} has no downloaded shards; run `mmloom download {store.root}` first")
    return downloaded


STAGE_DEF = Stage(
    name=STAGE, out_dir=OUT_DIR, section="score",
    shards=_shards,
    # a re-downloaded shard (--retry-failed, verify --repair) is scored again
    inputs=lambda store, shard: (store.record("download", shard) or {}).get("files", {}),
    work=Actors(ScoreWorker, what="scoring models"),
    resources=lambda cfg: Resources(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker),
    ignore=frozenset({"batch_size", "device", "num_workers", "cpus_per_worker", "gpus_per_worker", "resize_on_device"}),
    extra=lambda store, config: {"encode_format": config.download.encode_format, "max_pixels": config.download.max_pixels},
)


def score(root: str, config: PipelineConfig, ray_address: str | None = None, progress: bool = True) -> dict:
    """Run the score stage (``stage.run_stage``): every downloaded shard whose scores are
    missing, or were made by other models or from other images."""
    s = run_stage(STAGE_DEF, root, config, ray_address, progress)
    s["rows"] = sum(r.get("rows", 0) for r in s["results"])
    return s
