"""`mmloom build`: selected samples + detections -> final/ interleaved-prompt shards.

Per shard: the crop rules pick each sample's crops; the tar holds, for every sample, the
same members (``schemas.FINAL_MEMBERS``): ``KEY.jpg`` (image), ``KEY.txt`` (clean
caption), ``KEY.raw.txt``, ``KEY.crops.jpg`` (every crop and head crop of the sample
side by side in one image, each starting on a 16-pixel boundary so JPEG blocks never mix
two crops; ``prompt.json`` gives each one's rectangle), ``KEY.prompt.json`` (segments and
crops, ``curate.prompt``), ``KEY.scores.json`` and ``KEY.json`` (keys, url, weight), and
``KEY.clip_image.npy`` (the score stage's stored CLIP image embedding, when it stored
them: Kandinsky's prior and MT-Diffusion's image-representation task train on it). A
fixed member set is what lets readers that infer a schema from the first samples
(Hugging Face ``datasets``, Ray Data) see every crop of every sample.

Tables, one per folder: ``manifest/NNNNN.parquet`` lists every selected sample with its
build status (view ``final``), ``crops/NNNNN.parquet`` one row per crop (view ``crops``).
Output is byte-deterministic: the same inputs and config give the same files (fixed tar
headers, sorted members).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from .config import BuildConfig, PipelineConfig
from .crops import apply_crop_rules
from .ground import selected_by_shard
from .prompt import build_segments, crop_entry
from .runner import Resources
from .stage import Stage, Task, run_stage
from .score import DEFAULT_MAX_PIXELS, decode_member, read_images
from mmloom.errors import UserError
from ..manifests import schemas as S
from ..manifests.store import ShardStore, shard_name

STAGE = "build"
OUT_DIR = S.STAGE_DIRS[STAGE]
MANIFEST_DIR, CROPS_DIR = S.TABLE_DIRS["final"][1], S.TABLE_DIRS["crops"][1]
LAYOUT = 2  # 2: one crops.jpg per sample, tables in their own folders (a dataset built before is rebuilt)
ALIGN = 16  # JPEG's largest block (4:2:0 chroma subsampling)
BUILT, NO_CROPS = "built", "too_few_crops"
SCORE_KEYS = ["clip_score", "nsfw", "watermark", "aesthetic", "face_count", "original_width", "original_height",
              "width", "height", "phash"]


INT_SCORES = {"face_count", "original_width", "original_height", "width", "height"}


def _typed(k: str, v):
    """One type per score key in every sample (an integer-valued float stays a float)."""
    if v is None or k == "phash":
        return v
    return int(v) if k in INT_SCORES else float(v)


def _npy(values) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.float32))
    return buf.getvalue()


def stored_embeddings(store: ShardStore, shard: int) -> dict:
    """sample_key -> CLIP image embedding at CLIP's own scale (the stored unit vector times
    its stored ``clip_image_norm``: transformers' ``image_embeds``, what Kandinsky's
    released weights take), from the score stage's shard; empty when the score stage did
    not store embeddings. Scores written before the norm was stored give the unit vectors."""
    if not store.is_committed("score", shard):
        return {}
    t = store.read_table_verified("score", shard, f"scores/{shard_name(shard)}.parquet")
    if "clip_image_embedding" not in t.column_names:
        return {}
    keys, embs = t.column("sample_key").to_pylist(), t.column("clip_image_embedding").to_pylist()
    if "clip_image_norm" in t.column_names:
        import numpy as np

        embs = [None if e is None or n is None else np.asarray(e, np.float32) * np.float32(n)
                for e, n in zip(embs, t.column("clip_image_norm").to_pylist())]
    return dict(zip(keys, embs))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _jpeg(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def pack_crops(images: list) -> tuple[object, list[list[int]]]:
    """Crops side by side in one RGB image, each starting at a multiple of ``ALIGN`` pixels
    so that no JPEG block holds pixels of two crops; returns it and each crop's rectangle."""
    from PIL import Image

    x, rects = 0, []
    for im in images:
        w, h = im.size
        rects.append([x, 0, x + w, h])
        x += -(-w // ALIGN) * ALIGN
    height = -(-max([ALIGN] + [im.size[1] for im in images]) // ALIGN) * ALIGN
    sheet = Image.new("RGB", (max(x, ALIGN), height))
    for im, r in zip(images, rects):
        sheet.paste(im, (r[0], r[1]))
    return sheet, rects


def build_shard(shard: int, root: str, cfg: dict, chash: str, encode_format: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    bcfg = BuildConfig.model_validate(cfg)
    store = ShardStore(root)
    samples = sorted(selected_by_shard(store).get(shard, []), key=lambda r: r["key"])
    full = {r["sample_key"]: r for r in store.read_table_verified("select", 0, S.SELECTED_FILE).to_pylist()
            if r["shard"] == shard}
    det_rows = store.read_table_verified("ground", shard, f"detections/{shard_name(shard)}.parquet").to_pylist()
    dets: dict[str, list[dict]] = {}
    for d in det_rows:
        dets.setdefault(d["sample_key"], []).append(d)
    embeddings = stored_embeddings(store, shard)
    blobs = read_images(store, shard, encode_format)
    staging = store.staging_dir(OUT_DIR, shard)
    tar_path = os.path.join(staging, "final.tar")
    manifest, crop_rows, dropped = [], [], Counter()
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for r in samples:
            s = full[r["sample_key"]]
            key = r["key"]
            img = decode_member(store, shard, blobs, key, encode_format, max_pixels)
            chosen, why = apply_crop_rules(dets.get(r["sample_key"], []), img.size, bcfg)
            dropped.update(why)
            status = BUILT if len(chosen) >= bcfg.min_crops else NO_CROPS
            has_person = any(c["is_person"] for c in chosen)
            weight = bcfg.person_weight if has_person else 1.0
            manifest.append({
                "sample_key": r["sample_key"], "key": key, "shard": shard, "status": status,
                "reason": None if status == BUILT else f"{len(chosen)} crop(s) after the crop rules, min_crops is {bcfg.min_crops}",
                "clean_caption": s["clean_caption"], "caption": s["caption"], "url": s["url"],
                "n_crops": len(chosen), "has_person": has_person, "weight": weight,
                "phrases": [c["phrase"] for c in chosen],
            })
            if status != BUILT:
                continue
            pieces = [img.crop([int(round(v)) for v in c["box"]]) for c in chosen]
            heads = [i for i, c in enumerate(chosen) if c["is_person"] and c["head_box"] is not None]
            pieces += [img.crop([int(round(v)) for v in chosen[i]["head_box"]]) for i in heads]
            sheet, rects = pack_crops(pieces)
            head_of = {i: len(chosen) + j for j, i in enumerate(heads)}
            entries = []
            for i, c in enumerate(chosen):
                c = {**c, "label": "person" if c["is_person"] else c["phrase"].lower()}
                entries.append(crop_entry(c, rects[i], head=head_of.get(i, -1)))
                box = [int(round(v)) for v in c["box"]]
                crop_rows.append({
                    "sample_key": r["sample_key"], "key": key, "shard": shard, "crop_index": i,
                    "phrase": c["phrase"], "span_start": c["span_start"], "span_end": c["span_end"],
                    "box": [float(v) for v in c["box"]], "score": float(c["score"]), "is_person": bool(c["is_person"]),
                    "label": c["label"], "rect": rects[i], "head_box": c["head_box"],
                    "head_rect": rects[head_of[i]] if i in head_of else None,
                    "crop_width": box[2] - box[0], "crop_height": box[3] - box[1],
                })
            for i in heads:
                entries.append(crop_entry({**chosen[i], "label": "head"}, rects[head_of[i]], kind="head"))
            segments = build_segments(s["clean_caption"], chosen)
            _add(tar, f"{key}.{encode_format}", blobs[key])
            _add(tar, f"{key}.txt", s["clean_caption"].encode())
            _add(tar, f"{key}.raw.txt", (s["caption"] or "").encode())
            _add(tar, f"{key}.crops.jpg", _jpeg(sheet, bcfg.crop_quality))
            _add(tar, f"{key}.prompt.json", _json({"segments": segments, "crops": entries}))
            _add(tar, f"{key}.scores.json", _json({k: _typed(k, s.get(k)) for k in SCORE_KEYS if k in s}))
            _add(tar, f"{key}.json", _json({"sample_key": r["sample_key"], "key": key, "url": s["url"],
                                            "weight": weight, "has_person": has_person}))
            if embeddings:  # every sample or none: the score stage stores them for every image it scores
                emb = embeddings.get(r["sample_key"])
                if emb is None:
                    raise ValueError(f"sample {r['sample_key']} has no stored CLIP image embedding while others do")
                _add(tar, f"{key}.clip_image.npy", _npy(emb))
    mpath = os.path.join(staging, "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), mpath)
    cpath = os.path.join(staging, "crops.parquet")
    pq.write_table(pa.Table.from_pylist(crop_rows, schema=CROPS_SCHEMA), cpath)
    name = shard_name(shard)
    built = sum(m["status"] == BUILT for m in manifest)
    store.commit(STAGE, shard, {f"{OUT_DIR}/{name}.tar": tar_path, f"{MANIFEST_DIR}/{name}.parquet": mpath,
                                f"{CROPS_DIR}/{name}.parquet": cpath},
                 {"rows": len(manifest), "built": built, "crops": len(crop_rows)}, chash,
                 {"dropped_boxes": dict(dropped)})
    store.discard(staging)
    for old in (f"{name}.parquet", f"{name}_crops.parquet"):  # the tables' place before they had their own folders
        if store.exists(OUT_DIR, old):
            store.fs.rm_file(store.path(OUT_DIR, old))
    return {"built": built, "samples": len(manifest), "crops": len(crop_rows), "dropped": dict(dropped)}


MANIFEST_SCHEMA = pa.schema([
    ("sample_key", pa.string()), ("key", pa.string()), ("shard", pa.int32()), ("status", pa.string()),
    ("reason", pa.string()), ("clean_caption", pa.string()), ("caption", pa.string()), ("url", pa.string()),
    ("n_crops", pa.int32()), ("has_person", pa.bool_()), ("weight", pa.float32()), ("phrases", pa.list_(pa.string())),
])
CROPS_SCHEMA = pa.schema([
    ("sample_key", pa.string()), ("key", pa.string()), ("shard", pa.int32()), ("crop_index", pa.int32()),
    ("phrase", pa.string()), ("span_start", pa.int32()), ("span_end", pa.int32()),
    ("box", pa.list_(pa.float32())), ("score", pa.float32()), ("is_person", pa.bool_()), ("label", pa.string()),
    ("rect", pa.list_(pa.int32())), ("head_box", pa.list_(pa.float32())), ("head_rect", pa.list_(pa.int32())),
    ("crop_width", pa.int32()), ("crop_height", pa.int32()),
])


def _shards(store: ShardStore, config: PipelineConfig) -> list[int]:
    by_shard = selected_by_shard(store)
    if not by_shard and not store.is_committed("select", 0):
        raise UserError(f"{store.root} has no selection yet; run `mmloom select {store.root}` first")
    missing = [s for s in by_shard if not store.is_committed("ground", s)]
    if missing:
        raise UserError(f"{store.root}: shards {missing[:10]} are not grounded yet; run `mmloom ground {store.root}` first")
    return sorted(by_shard)


def _inputs(store: ShardStore, shard: int) -> dict:
    """Its detections (themselves made from the selection and the images) and the stored
    embeddings of its scores."""
    return {"detections": store.record("ground", shard)["files"],
            "scores": (store.record("score", shard) or {}).get("files", {}), "layout": LAYOUT}


STAGE_DEF = Stage(
    name=STAGE, out_dir=OUT_DIR, section="build",
    shards=_shards, inputs=_inputs,
    work=Task(build_shard),
    resources=lambda cfg: Resources(num_cpus=1),
    ignore=frozenset({"card_examples"}),  # the card, not the shards
    extra=lambda store, config: {"encode_format": config.download.encode_format, "max_pixels": config.download.max_pixels},
)


def build(root: str, config: PipelineConfig, ray_address: str | None = None, progress: bool = True) -> dict:
    """Run the build stage (``stage.run_stage``) over the grounded shards."""
    s = run_stage(STAGE_DEF, root, config, ray_address, progress)
    c = Counter(s["counts"])
    s.update(built=c["built"], samples=c["rows"], crops=c["crops"])
    return s
