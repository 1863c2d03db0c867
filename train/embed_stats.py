"""Element-wise statistics of the stored CLIP image embeddings over a whole dataset.

Kandinsky (section 4) normalizes every element of the image embedding with full-dataset
statistics before its prior learns to predict it, and denormalizes at inference. The
dataset is what the prior trains on: the samples the select stage kept, not every image
the score stage embedded (rejects would shift the statistics). The score stage stored
the embeddings; one DuckDB pass over the ``scores`` view joined with the ``selected``
view computes the mean and standard deviation per element, out of core, however large
the dataset. A bare folder of final/ shards (no manifests) is scanned instead (they hold
selected samples only).
"""

from __future__ import annotations

import numpy as np

from mmloom.errors import UserError

COLUMN = "clip_image_embedding"
NORM = "clip_image_norm"  # the unit vector's length before normalization (score stage)


def dataset_root(spec: str) -> str | None:
    """The dataset directory behind ``data.shards`` (DIR, DIR/final, DIR/final/*.tar), if any."""
    from ..manifests.store import ShardStore

    candidates = [spec.rstrip("/")]
    if "/final" in spec:
        candidates.append(spec.rstrip("/").rsplit("/final", 1)[0])
    for c in candidates:
        if not c or any(ch in c for ch in "*?{"):
            continue
        if ShardStore(c).exists("_commits"):
            return c
    return None


def embedding_stats(spec: str, allow_pipe: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean [D], std [D], count) of the stored image embeddings behind ``data.shards``
    (``allow_pipe``: the user's ``data.allow_pipe``, for ``pipe:`` specs)."""
    root = dataset_root(spec)
    if root is not None:
        from ..manifests.sql import ident
        from ..manifests.views import open_dataset, reading, view_names

        con = open_dataset(root)
        try:
            with reading(root):  # a damaged committed file: one line naming it
                views = view_names(con)
                cols = {r[0] for r in con.execute("DESCRIBE scores").fetchall()} if "scores" in views else set()
                if COLUMN not in cols:
                    raise UserError(f"{root} has no stored CLIP image embeddings: run the score stage with score.clip.store_embeddings")
                if "selected" not in views:
                    raise UserError(f"{root} has no selection: the normalization statistics are over the selected samples, run the select stage")
                # CLIP's own scale where the score stage stored the norm (what build writes)
                value = (f"list_transform({ident(COLUMN)}, lambda x: x * {ident(NORM)})" if NORM in cols else ident(COLUMN))
                rows = con.execute(f"""
                    WITH e AS (SELECT {value} AS v FROM scores
                               WHERE {ident(COLUMN)} IS NOT NULL AND sample_key IN (SELECT sample_key FROM selected)),
                         x AS (SELECT unnest(generate_series(1, len(v))) AS i, unnest(v) AS val FROM e)
                    SELECT i, avg(val), stddev_pop(val), count(*) FROM x GROUP BY i ORDER BY i
                """).fetchall()
        finally:
            con.close()
        if not rows:
            raise UserError(f"{root}: no selected sample holds a stored CLIP image embedding")
        mean = np.array([r[1] for r in rows], np.float32)
        std = np.array([r[2] for r in rows], np.float32)
        return mean, std, int(rows[0][3])
    return _scan_shards(spec, allow_pipe)


def _scan_shards(spec: str, allow_pipe: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    from .data import read_members, shard_urls

    total = total_sq = None
    n = 0
    for s in read_members(shard_urls(spec, allow_pipe), {"clip_image.npy"}):  # no other member is read (never a pickle)
        v = s.get("clip_image.npy")
        if v is None:
            continue
        v = v.astype(np.float64)
        total = v if total is None else total + v
        total_sq = v * v if total_sq is None else total_sq + v * v
        n += 1
    if n == 0:
        raise UserError(f"data.shards {spec!r}: no sample holds a stored CLIP image embedding (KEY.clip_image.npy)")
    mean = total / n
    return mean.astype(np.float32), np.sqrt(np.maximum(total_sq / n - mean * mean, 0)).astype(np.float32), n


# the curation config that stores each width a family trains on (score.clip.model)
CURATION_FOR = {512: "configs/laion.yaml (ViT-B-32/openai)", 768: "configs/laion-kandinsky.yaml (ViT-L-14/openai)",
                1024: "configs/laion-mtdiffusion.yaml (ViT-H-14/laion2b_s32b_b79k)"}


def clip_width(ref: str) -> int | None:
    """The embedding width of an open_clip model reference, read from its config without
    loading weights (``ARCH/TAG``, a local directory, ``tiny:NAME``); None if unknown."""
    import json
    import os

    from ..testkit.tiny_train import resolve_tiny

    if ref.startswith("tiny:"):
        ref = resolve_tiny(ref)
    cfg_file = os.path.join(os.path.expanduser(ref), "open_clip_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            return int(json.load(f)["model_cfg"]["embed_dim"])
    if "/" in ref and not ref.startswith("hf-hub:"):
        import open_clip

        cfg = open_clip.get_model_config(ref.split("/", 1)[0])
        return int(cfg["embed_dim"]) if cfg else None
    return None


def stored_width(spec: str, allow_pipe: bool = False) -> int | None:
    """The width of the CLIP image embeddings stored behind ``data.shards`` (the first one
    found: the score stage stores one model's), or None if none can be read here (no
    dataset yet, as when sampling a run whose data has moved: the loader says so later)."""
    if not spec:
        return None
    try:
        root = dataset_root(spec)
        if root is not None:
            from ..manifests.sql import ident
            from ..manifests.views import open_dataset, view_names

            con = open_dataset(root)
            try:
                if "scores" not in view_names(con):
                    return None
                row = con.execute(f"SELECT len({ident(COLUMN)}) FROM scores WHERE {ident(COLUMN)} IS NOT NULL LIMIT 1").fetchone()
            finally:
                con.close()
            return int(row[0]) if row else None
        from .data import read_members, shard_urls

        for s in read_members(shard_urls(spec, allow_pipe)[:1], {"clip_image.npy"}):
            v = s.get("clip_image.npy")
            if v is not None:
                return int(v.shape[-1])
    except (UserError, OSError, ValueError):
        return None
    return None


def check_stored_width(spec: str, allow_pipe: bool, want: int | None, field: str, value) -> None:
    """Refuse, before a model builds, shards whose stored CLIP image embeddings are not
    ``want`` wide (what ``field`` = ``value`` of the family trains on): one line naming both
    widths and the curation config that stores ``want``."""
    have = stored_width(spec, allow_pipe)
    if want is None or have is None or have == want:
        return
    fix = CURATION_FOR.get(want, f"a curation config whose score.clip.model gives {want}-d embeddings")
    raise UserError(f"data.shards {spec} holds {have}-d CLIP image embeddings but {field} {value} needs {want}-d: "
                    f"curate with {fix} (score.clip.model, store_embeddings: true) and train on those shards")
