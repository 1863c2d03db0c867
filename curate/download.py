"""`mmloom download`: candidate shards -> webdataset tars via img2dataset, as Ray work.

Each candidate shard is one Ray task that runs img2dataset's own ``Downloader`` on the
shard's eligible rows, into a private staging folder. What img2dataset lacks is added
around it:

* every candidate row ends with exactly one status (non-candidates are ``skipped``);
* the shard is checked (tar members agree with the status parquet) and committed
  atomically with a completion record; a rerun redoes exactly the uncommitted shards;
* ``retry_failed`` re-fetches failed samples of committed shards and recommits;
* URLs are fetched by ``fetch`` in place of img2dataset's urllib call: hosts resolving
  to non-public addresses are refused (``netguard``), redirects included, and the socket
  connects to the checked address; one deadline bounds each request and
  ``max_body_bytes`` its body; URLs are percent-encoded like a browser does;
* only JPEG, PNG, WebP and GIF are decoded (``imageguard``): their header is read first,
  more than ``max_pixels`` is refused before decoding, truncated files and every other
  format (TIFF, BMP, Radiance HDR, PFM, OpenEXR ...) are ``failed_to_resize``.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tarfile
import time
from collections import Counter

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import

import pyarrow as pa
import pyarrow.parquet as pq

from .config import DownloadConfig, PipelineConfig
from .runner import Resources
from .stage import Stage, Task, run_stage
from mmloom.errors import UserError
from ..manifests import schemas as S
from ..manifests.store import ShardStore, shard_name

STAGE = "download"
OUT_DIR = S.STAGE_DIRS[STAGE]
OPT_OUT_MESSAGE = "Use of image disallowed by X-Robots-Tag directive"
REFUSED_PREFIX = "refused:"  # netguard.REFUSED_PREFIX, and the resizer's pixel-bomb refusals

STATUS_SCHEMA = pa.schema([
    ("sample_key", pa.string()), ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("status", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string()),
])


def img2dataset_modules() -> None:
    """Let ``import img2dataset.X`` load X and what X imports, not img2dataset's package
    ``__init__``, which imports its whole CLI (Spark and Ray distributors, readers, every
    writer): seconds of start-up in every download worker for nothing the stage uses.
    Nothing changes where img2dataset is already imported."""
    import importlib.util
    import types

    if "img2dataset" in sys.modules:
        return
    spec = importlib.util.find_spec("img2dataset")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: the import that follows says so
    pkg = types.ModuleType("img2dataset", "img2dataset's modules, without its CLI (mmloom.curate.download)")
    pkg.__path__, pkg.__spec__, pkg.__file__ = list(spec.submodule_search_locations), spec, spec.origin
    sys.modules["img2dataset"] = pkg


def make_resizer(cfg: DownloadConfig):
    """img2dataset's Resizer behind ``imageguard.inspect``: format allow-list, pixel count
    from the header, truncation; nothing else reaches OpenCV's decoder."""
    img2dataset_modules()
    from img2dataset.resizer import Resizer
    from PIL import Image

    from mmloom import imageguard

    # our own limit (max_pixels, checked on the header before any decode) replaces PIL's
    Image.MAX_IMAGE_PIXELS = None

    class GuardedResizer(Resizer):
        def __call__(self, img_stream, blurring_bbox_list=None):
            data = img_stream.getvalue()
            try:
                head = imageguard.inspect(data, cfg.max_pixels)
            except imageguard.ImageRejected as e:
                err = f"{S.REFUSED}: {e.reason}" if e.status == S.REFUSED else e.reason
                return None, None, None, None, None, err
            if head.format == "JPEG" and blurring_bbox_list is None:
                out = _scaled_jpeg(self, data, head)
                if out is not None:
                    return out
            return super().__call__(img_stream, blurring_bbox_list)

    return GuardedResizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_quality=cfg.encode_quality,
        encode_format=cfg.encode_format,
        max_image_area=cfg.max_pixels,
    )


# OpenCV's reduced-size JPEG decodes: libjpeg's DCT scaling to 1/2, 1/4, 1/8
_REDUCED = {2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4", 8: "IMREAD_REDUCED_COLOR_8"}


def output_size(resizer, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) img2dataset's Resizer scales an image of this size to (albumentations'
    SmallestMaxSize / LongestMaxSize, before a center crop or border), or None where it
    does not shrink it."""
    from img2dataset.resizer import ResizeMode

    mode = resizer.resize_mode
    if mode in (ResizeMode.keep_ratio, ResizeMode.center_crop):
        side = min(width, height)
    elif mode in (ResizeMode.border, ResizeMode.keep_ratio_largest):
        side = max(width, height)
    else:
        return None
    if side <= resizer.image_size:
        return None
    s = resizer.image_size / side
    return max(1, round(width * s)), max(1, round(height * s))


def dct_reduction(width: int, height: int, w: int, h: int) -> int:
    """The largest of libjpeg's reductions 1, 2, 4, 8 at which a width x height JPEG still
    has at least w x h pixels (every output pixel made from at least one decoded one)."""
    r = 1
    while r < 8 and width // (2 * r) >= w and height // (2 * r) >= h:
        r *= 2
    return r


def _scaled_jpeg(resizer, data: bytes, head):
    """A JPEG that shrinks at least 2x is decoded by libjpeg at 1/2, 1/4 or 1/8 of its size
    (the largest reduction that keeps every output pixel made from at least one decoded
    one), then resized with the resizer's own downscale interpolation to the size
    img2dataset's Resizer gives and encoded with its settings: the same output shape and
    fields, a fraction of the decoding work. None: not applicable (img2dataset's path)."""
    import cv2
    import numpy as np

    size = output_size(resizer, head.width, head.height)
    if size is None:
        return None
    w, h = size
    r = dct_reduction(head.width, head.height, w, h)
    if r == 1:
        return None
    flags = getattr(cv2, _REDUCED[r]) | cv2.IMREAD_IGNORE_ORIENTATION  # img2dataset ignores EXIF orientation too
    try:
        cv2.setNumThreads(1)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if img is None:
            return None  # img2dataset's path decides (and names the error)
        img = cv2.resize(img, (w, h), interpolation=resizer.downscale_interpolation)
        from img2dataset.resizer import ResizeMode

        if resizer.resize_mode == ResizeMode.center_crop:
            import albumentations as A

            img = A.CenterCrop(height=resizer.image_size, width=resizer.image_size)(image=img)["image"]
        elif resizer.resize_mode == ResizeMode.border:
            import albumentations as A

            img = A.PadIfNeeded(min_height=resizer.image_size, min_width=resizer.image_size,
                                border_mode=cv2.BORDER_CONSTANT, value=[255, 255, 255], p=1.0)(image=img)["image"]
        ok, enc = cv2.imencode(f".{resizer.encode_format}", img, params=resizer.encode_params)
    except cv2.error:
        return None
    if not ok:
        return None
    return enc.tobytes(), img.shape[1], img.shape[0], head.width, head.height, None


class TarSampleWriter:
    """img2dataset's ``WebDatasetSampleWriter`` (same arguments, same files: ``NNNNN.tar``
    with ``KEY.<format>``, ``KEY.txt`` and ``KEY.json`` per image, and ``NNNNN.parquet``
    with every sample's metadata) written with ``tarfile`` and pyarrow: its module
    imports webdataset, which imports torch, seconds of start-up in every worker."""

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        name = f"{shard_id:0{oom_shard_count}d}"
        self.tar = tarfile.open(os.path.join(output_folder, name + ".tar"), "w")
        self.parquet = pq.ParquetWriter(os.path.join(output_folder, name + ".parquet"), schema)
        self.schema, self.rows = schema, []
        self.save_caption, self.encode_format = save_caption, encode_format

    def write(self, img_str, key, caption, meta):
        if img_str is not None:
            members = {self.encode_format: img_str}
            if self.save_caption:
                members["txt"] = (str(caption) if caption is not None else "").encode()
            meta = {k: (v.tolist() if hasattr(v, "tolist") and not isinstance(v, (int, float, str)) else v) for k, v in meta.items()}
            members["json"] = json.dumps(meta, indent=4).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o444, int(time.time())
                info.uname = info.gname = "bigdata"  # as webdataset's TarWriter
                self.tar.addfile(info, io.BytesIO(data))
        self.rows.append(meta)
        if len(self.rows) >= 100:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.parquet.write_table(pa.Table.from_pylist(self.rows, self.schema))
            self.rows = []

    def close(self):
        self._flush()
        self.parquet.close()
        self.tar.close()


def opencv_pixel_ceiling(max_pixels: int) -> bool:
    """Set OpenCV's own pixel ceiling, a second line behind the header check. OpenCV reads
    it once, when cv2 is first imported in the process: True if this call was in time."""
    from mmloom import imageguard

    if "cv2" in sys.modules:
        return False
    os.environ[imageguard.CV_MAX_PIXELS_ENV] = str(max_pixels)
    return True


def classify(i2d_status: str, error: str | None) -> tuple[str, str | None]:
    """img2dataset's (status, error_message) -> mmloom's download status."""
    if i2d_status == "success":
        return S.SUCCESS, None
    err = error or ""
    if err.startswith(OPT_OUT_MESSAGE):
        return S.OPTED_OUT, "X-Robots-Tag opts out of AI use"
    if err.startswith(REFUSED_PREFIX):  # only mmloom's own refusals, never a server's text
        return S.REFUSED, err[len(REFUSED_PREFIX):].strip()
    return i2d_status, err


def retryable(row: dict) -> bool:
    """What ``--retry-failed`` fetches again: failed downloads and decodes, and hosts that
    did not resolve (refused then, since an address that can't be checked is never
    contacted, but DNS failures pass)."""
    if row["status"] in (S.FAILED_TO_DOWNLOAD, S.FAILED_TO_DECODE):
        return True
    return row["status"] == S.REFUSED and "does not resolve" in (row.get("error_message") or "")


def key_for(index: int, shard: int, shard_size: int) -> str:
    """img2dataset's sample key for row ``index`` of a shard (its compute_key)."""
    img2dataset_modules()
    from img2dataset.downloader import compute_key

    return compute_key(index, shard, math.ceil(math.log10(max(shard_size, 2))), 5)


def _i2d_shard_size(shard_size: int) -> int:
    return max(shard_size, 2)


def run_img2dataset(rows: pa.Table, shard: int, staging: str, cfg: DownloadConfig, shard_size: int) -> tuple[str, str]:
    """Download ``rows`` (url, caption, sample_key) with img2dataset into ``staging``."""
    opencv_pixel_ceiling(cfg.max_pixels)
    img2dataset_modules()
    from img2dataset.downloader import Downloader

    from . import fetch
    feed = os.path.join(staging, "input.arrow")
    with pa.OSFile(feed, "wb") as sink, pa.ipc.new_file(sink, rows.schema) as w:
        w.write_table(rows)
    out = os.path.join(staging, "i2d")
    os.makedirs(out, exist_ok=True)
    downloader = Downloader(
        sample_writer_class=TarSampleWriter,
        resizer=make_resizer(cfg),
        thread_count=cfg.thread_count,
        save_caption=True,
        extract_exif=False,
        output_folder=out,
        column_list=rows.column_names,
        timeout=cfg.timeout,
        number_sample_per_shard=_i2d_shard_size(shard_size),
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=cfg.encode_format,
        retries=cfg.retries,
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=cfg.disallowed_header_directives or None,
    )
    limits = fetch.Limits(timeout=cfg.timeout, deadline=cfg.deadline, max_body_bytes=cfg.max_body_bytes,
                          allow_private=cfg.allow_private_addresses)
    with fetch.installed(limits):
        downloader.download_shard((shard, feed))  # raises on shard-level failure
    base = os.path.join(out, shard_name(shard))
    return base + ".tar", base + ".parquet"


def _tar_keys(path: str, ext: str) -> list[str]:
    with tarfile.open(path) as t:
        return [m.name.rsplit(".", 1)[0] for m in t.getmembers() if m.name.endswith("." + ext)]


def _merge_tars(old, new, rename: dict[str, str], out: str) -> None:
    """old tar + new tar (open binary files; members of new renamed old-key-wise) -> out tar."""
    with tarfile.open(out, "w") as dst:
        for src, ren in ((old, {}), (new, rename)):
            with tarfile.open(fileobj=src) as t:
                for m in t.getmembers():
                    data = t.extractfile(m).read()
                    stem, ext = m.name.rsplit(".", 1)
                    if stem in ren:
                        if ext == "json":
                            meta = json.loads(data)
                            meta["key"] = ren[stem]
                            data = json.dumps(meta, indent=4).encode()
                        m = tarfile.TarInfo(f"{ren[stem]}.{ext}")
                    m.size = len(data)
                    dst.addfile(m, io.BytesIO(data))


def download_shard(shard: int, root: str, cfg: dict, shard_size: int, retry_failed: bool, chash: str) -> dict:
    """Ray task body: download one candidate shard and commit it."""
    dcfg = DownloadConfig.model_validate(cfg)
    store = ShardStore(root)
    rec = store.record(STAGE, shard)
    # a committed shard made with other settings or inputs is redone whole, never merged
    committed = rec is not None and rec.get("config_hash") == chash and store.matches(rec)
    if committed and not retry_failed:
        return {"skipped": True}
    cands = store.read_table_verified(
        "ingest", shard, f"{S.STAGE_DIRS['ingest']}/{shard_name(shard)}.parquet",
        columns=["sample_key", "url", "caption", "status", "reason"],
    ).to_pylist()
    keys = {}  # sample_key -> img2dataset key, from each candidate's position in the shard
    eligible = [r for r in cands if r["status"] == S.CANDIDATE]
    for i, r in enumerate(eligible):
        keys[r["sample_key"]] = key_for(i, shard, shard_size)

    prev: dict[str, dict] = {}
    if committed:  # retry_failed: fetch only what failed to download or decode
        prev = {r["sample_key"]: r for r in store.read_table_verified(STAGE, shard, f"{OUT_DIR}/{shard_name(shard)}.parquet").to_pylist()}
        todo = [r for r in eligible if retryable(prev[r["sample_key"]])]
        if not todo:
            return {"skipped": True}
    else:
        todo = eligible

    staging = store.staging_dir(OUT_DIR, shard)
    feed = pa.table({
        "url": [r["url"] for r in todo],
        "caption": [r["caption"] for r in todo],
        "sample_key": [r["sample_key"] for r in todo],
    })
    tar_path, i2d_parquet = run_img2dataset(feed, shard, staging, dcfg, shard_size)
    fetched = {r["sample_key"]: r for r in pq.read_table(i2d_parquet).to_pylist()}
    if len(fetched) != len(todo):
        raise RuntimeError(f"img2dataset returned {len(fetched)} rows for {len(todo)} inputs in shard {shard}")

    rows, rename = [], {}
    for r in cands:
        sk = r["sample_key"]
        if r["status"] != S.CANDIDATE:
            rows.append({"sample_key": sk, "key": None, "url": r["url"], "caption": r["caption"],
                         "status": S.SKIPPED, "error_message": f"{r['status']} at ingest: {r['reason']}"})
            continue
        got = fetched.get(sk)
        if got is None:  # retry run: keep the earlier result
            rows.append({k: prev[sk].get(k) for k in STATUS_SCHEMA.names})
            continue
        status, err = classify(got["status"], got["error_message"])
        if got["key"] != keys[sk]:
            rename[got["key"]] = keys[sk]
        rows.append({
            "sample_key": sk, "key": keys[sk], "url": r["url"], "caption": r["caption"],
            "status": status, "error_message": err,
            **{k: got.get(k) for k in ("width", "height", "original_width", "original_height", "sha256")},
        })
    if committed:
        merged = os.path.join(staging, "merged.tar")
        old = io.BytesIO(store.read_verified(STAGE, shard, f"{OUT_DIR}/{shard_name(shard)}.tar"))
        with open(tar_path, "rb") as new:
            _merge_tars(old, new, rename, merged)
        tar_path = merged
    table = pa.Table.from_pylist(rows, schema=STATUS_SCHEMA)
    status_parquet = os.path.join(staging, "status.parquet")
    pq.write_table(table, status_parquet)

    # the shard is only real if the tar and the status parquet agree
    counts = Counter(r["status"] for r in rows)
    in_tar = _tar_keys(tar_path, dcfg.encode_format)
    ok_keys = sorted(r["key"] for r in rows if r["status"] == S.SUCCESS)
    if sorted(in_tar) != ok_keys or len(rows) != len(cands):
        raise RuntimeError(
            f"shard {shard}: tar has {len(in_tar)} images but the status parquet lists {len(ok_keys)} successes "
            f"({len(rows)} rows for {len(cands)} candidates); not committed"
        )
    stats = {
        "shard": shard, "count": len(rows), "attempted": len(todo),
        "successes": counts[S.SUCCESS], "status_dict": dict(counts),
        "retry": committed,
    }
    i2d_stats = os.path.join(os.path.dirname(i2d_parquet), shard_name(shard) + "_stats.json")
    if os.path.exists(i2d_stats):
        stats["img2dataset"] = json.load(open(i2d_stats))
    stats_path = os.path.join(staging, "stats.json")
    json.dump(stats, open(stats_path, "w"), indent=1)
    base = f"{OUT_DIR}/{shard_name(shard)}"
    store.commit(
        STAGE, shard,
        {base + ".tar": tar_path, base + ".parquet": status_parquet, base + "_stats.json": stats_path},
        {"rows": len(rows), **dict(counts)}, chash,
    )
    store.discard(staging)
    return {"counts": dict(counts), "attempted": len(todo)}


def _shards(store: ShardStore, config: PipelineConfig) -> list[int]:
    return list(range(_ingest_summary(store)["shards"]))


def _ingest_summary(store: ShardStore) -> dict:
    path = store.path("_commits", "ingest.json")
    if not store.fs.exists(path):
        raise UserError(f"{store.root} has no ingested candidates; run `mmloom ingest SOURCE --out {store.root}` first")
    with store.fs.open(path, "r") as f:
        return json.load(f)


STAGE_DEF = Stage(
    name=STAGE, out_dir=OUT_DIR, section="download",
    shards=_shards,
    inputs=lambda store, shard: (store.record("ingest", shard) or {}).get("files", {}),
    work=Task(download_shard),
    resources=lambda cfg: Resources(num_cpus=cfg.cpus_per_shard, max_retries=cfg.shard_retries),
    # how it fetches, not what it keeps: changing these redoes nothing (--retry-failed does)
    ignore=frozenset({"thread_count", "timeout", "deadline", "retries", "cpus_per_shard", "shard_retries"}),
    extra=lambda store, config: {"shard_size": _ingest_summary(store)["shard_size"]},
)


def download(root: str, config: PipelineConfig, ray_address: str | None = None, retry_failed: bool = False, progress: bool = True) -> dict:
    """Run the download stage (``stage.run_stage``); ``retry_failed`` also revisits every
    up-to-date shard to fetch its failed samples again."""
    s = run_stage(STAGE_DEF, root, config, ray_address, progress,
                  redo=(lambda shard: "retry failed samples") if retry_failed else None,
                  options={"retry_failed": retry_failed})
    s["status_counts"] = {k: v for k, v in s["counts"].items() if k != "rows"}
    return s
