"""`mmloom ground`: every box Grounding DINO finds for the phrases of each selected
sample's clean caption -> detections/ parquet, before any crop rule.

One Ray actor per worker holds the model; each takes a shard of selected samples, reads
their images from images/NNNNN.tar and detects in batches (each image with its own
caption). Person boxes get a head box. A shard commits atomically; when the selection
or the settings change, its record no longer matches and the shard is redone.
"""

from __future__ import annotations

import contextlib
import os

import pyarrow as pa
import pyarrow.parquet as pq

from .config import GroundConfig, PipelineConfig
from .runner import Resources
from .stage import Actors, ActorWorker, Stage, run_stage
from .score import DEFAULT_MAX_PIXELS, ahead, decode_member, prefetch_threads, read_images
from mmloom.errors import UserError
from ..manifests import schemas as S
from ..manifests.store import ShardStore, shard_name

STAGE = "ground"
OUT_DIR = S.STAGE_DIRS[STAGE]

SCHEMA = pa.schema([
    ("sample_key", pa.string()), ("key", pa.string()), ("shard", pa.int32()), ("det_id", pa.int32()),
    ("phrase", pa.string()), ("span_start", pa.int32()), ("span_end", pa.int32()),
    ("box", pa.list_(pa.float32())), ("score", pa.float32()), ("text_score", pa.float32()),
    ("is_person", pa.bool_()), ("head_box", pa.list_(pa.float32())),
    ("image_width", pa.int32()), ("image_height", pa.int32()), ("model", pa.string()),
])


def boxes_column(cfg: GroundConfig) -> str:
    """The selection's column that keeps the metadata's boxes column (ingest's src_ name)."""
    from .sources import src_columns

    return src_columns([cfg.boxes_column])[0]


def selected_by_shard(store: ShardStore, extra: tuple[str, ...] = ()) -> dict[int, list[dict]]:
    if not store.is_committed("select", 0):
        return {}
    rows = store.read_table_verified("select", 0, S.SELECTED_FILE,
                                     columns=["sample_key", "key", "shard", "clean_caption", "width", "height", *extra]).to_pylist()
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(int(r["shard"]), []).append(r)
    return out


class GroundWorker(ActorWorker):
    def __init__(self, cfg: dict):
        from ..filters.grounding import HeadFinder, SuppliedBoxes, make_detector

        self.cfg = GroundConfig.model_validate(cfg)
        if self.cfg.backend == "boxes":
            self.dino, self.supplied = None, SuppliedBoxes(self.cfg.max_boxes)
            self.model_name = f"boxes:{self.cfg.boxes_column}"
        else:
            self.dino, self.supplied = make_detector(self.cfg), None
            self.model_name = self.dino.ref
        self.heads = HeadFinder(self.cfg.head_source, self.cfg.head_expand, self.dino) if self.cfg.head_source != "none" else None

    def run(self, shard: int, root: str, chash: str, encode_format: str, prefetch: int | None = None,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
        """Ground one shard's selected samples and commit. With the model on a GPU, worker
        threads (``prefetch``; default torch's CPU threads, at most 4) decode the next
        batches and run the processor on them (`GroundingDino.prepare`) while the model
        runs the current one; on the CPU the default is 0 (in turn), as in
        `curate.score.score_shard`."""

        from ..filters.grounding import is_person

        store = ShardStore(root)
        col = boxes_column(self.cfg) if self.supplied else None
        extra = (col, "original_width", "original_height") if col else ()
        # batch images of similar shape together: a batch is padded to its largest image
        samples = sorted(selected_by_shard(store, extra).get(shard, []), key=lambda r: (r["width"] / r["height"], r["key"]))
        blobs = read_images(store, shard, encode_format)
        rows: list[dict] = []
        refused: dict[str, int] = {}
        bs = self.cfg.batch_size

        def ready(batch: list[dict]):
            images = [decode_member(store, shard, blobs, r["key"], encode_format, max_pixels) for r in batch]
            captions = [r["clean_caption"] for r in batch]
            return batch, images, (self.dino.prepare(images, captions) if self.dino else None)

        batches = [samples[i:i + bs] for i in range(0, len(samples), bs)]
        threads = prefetch_threads(self.dino.device, prefetch) if self.dino else 0
        with contextlib.closing(ahead(ready, batches, threads)) as prepared:
            for batch, images, prep in prepared:
                dets = (self.dino.detect(images, [r["clean_caption"] for r in batch], prep) if self.dino else
                        [self._supplied(r, im, refused) for r, im in zip(batch, images)])
                for r, im, ds in zip(batch, images, dets):
                    for j, d in enumerate(ds):
                        person = is_person(d["phrase"], self.cfg.person_words)
                        head = self.heads(im, d["box"]) if (person and self.heads) else None
                        rows.append({
                            "sample_key": r["sample_key"], "key": r["key"], "shard": shard, "det_id": j,
                            "phrase": d["phrase"], "span_start": d["span"][0], "span_end": d["span"][1],
                            "box": d["box"], "score": d["score"], "text_score": d["text_score"],
                            "is_person": person, "head_box": head,
                            "image_width": im.size[0], "image_height": im.size[1], "model": self.model_name,
                        })
        rows.sort(key=lambda r: (r["key"], r["det_id"]))
        meta = {b"model": self.model_name.encode(), b"version": (self.dino or self.supplied).version.encode(),
                b"heads": (self.heads.version if self.heads else "none").encode()}
        table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata(meta))
        staging = store.staging_dir(OUT_DIR, shard)
        out = os.path.join(staging, "detections.parquet")
        pq.write_table(table, out)
        store.commit(STAGE, shard, {f"{OUT_DIR}/{shard_name(shard)}.parquet": out},
                     {"rows": len(rows), "samples": len(samples), "refused_boxes": sum(refused.values())}, chash)
        store.discard(staging)
        return {"boxes": len(rows), "samples": len(samples), "refused_boxes": refused}

    def _supplied(self, r: dict, im, refused: dict[str, int]) -> list[dict]:
        """The metadata's boxes of one sample (hostile: checked by SuppliedBoxes), refusals counted."""
        found, why = self.supplied.detect(r[boxes_column(self.cfg)], r["clean_caption"] or "",
                                          (r["original_width"], r["original_height"]), im.size)
        for k, v in why.items():
            refused[k] = refused.get(k, 0) + v
        return found


def _shards(store: ShardStore, config: PipelineConfig) -> list[int]:
    if not store.is_committed("select", 0):
        raise UserError(f"{store.root} has no selection yet; run `mmloom select {store.root}` first")
    cfg = config.ground
    if cfg.backend == "boxes":
        col = boxes_column(cfg)
        names = store.read_table_verified("select", 0, S.SELECTED_FILE).schema.names
        if col not in names:
            raise UserError(f"ground.boxes_column: the metadata has no column {cfg.boxes_column!r} "
                            f"(looked for {col} in the selection; source columns there: "
                            f"{', '.join(n[4:] for n in names if n.startswith('src_')) or 'none'})")
    return sorted(selected_by_shard(store))


def _inputs(store: ShardStore, shard: int) -> dict:
    """The selection (its one file) and the shard's downloaded images."""
    files = store.record("select", 0)["files"]
    # hashed under the names the files had before they moved to selected/ and rejects/, so
    # a dataset grounded before keeps its detections when its selection is unchanged
    return {"selection": {"selection/" + rel.rsplit("/", 1)[-1]: entry for rel, entry in files.items()},
            "images": (store.record("download", shard) or {}).get("files", {})}


STAGE_DEF = Stage(
    name=STAGE, out_dir=OUT_DIR, section="ground",
    shards=_shards, inputs=_inputs,
    work=Actors(GroundWorker, what="grounding model"),
    resources=lambda cfg: Resources(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker),
    ignore=frozenset({"batch_size", "device", "num_workers", "cpus_per_worker", "gpus_per_worker"}),
    extra=lambda store, config: {"encode_format": config.download.encode_format, "max_pixels": config.download.max_pixels},
)


def ground(root: str, config: PipelineConfig, ray_address: str | None = None, progress: bool = True) -> dict:
    """Run the ground stage (``stage.run_stage``) over the shards with selected samples."""
    s = run_stage(STAGE_DEF, root, config, ray_address, progress)
    s["boxes"] = sum(r.get("boxes", 0) for r in s["results"])
    refused: dict[str, int] = {}
    for r in s["results"]:
        for k, v in (r.get("refused_boxes") or {}).items():
            refused[k] = refused.get(k, 0) + v
    s["refused_boxes"] = refused
    return s
