"""Near-duplicate groups for select, found with a faiss index rather than over all pairs.

Two searches, one shape: find the pairs closer than a threshold with an index, join them
into groups (connected components, scipy), keep the best sample of each group.

* **Perceptual hashes** (``select.dedup_max_distance``): faiss's ``IndexBinaryMultiHash``
  is pigeonhole banding: the 64-bit hash is cut into ``max_distance + 1`` bands of bits,
  each a hash table; two hashes within ``max_distance`` bits agree on a whole band, so a
  range search only compares hashes that share a band bucket.
* **CLIP image embeddings** (``select.semantic_dedup_threshold``; SemDedup, Abbas et al.
  2023, and clip-retrieval's k-NN over stored embeddings): each sample's ``k`` nearest
  neighbours by cosine (inner product of the normalized embeddings stored by the score
  stage) from an exact flat index, or an inverted-file index (``IVF``, about sqrt(n)
  lists, ``nprobe`` of them searched) above ``IVF_FROM`` samples, so the cost grows with
  the index, not with all n^2 pairs; neighbours at or above the threshold are one group.

"Best" in a group: the highest CLIP score (the image matches its caption best), then the
larger original image (width x height), then the smaller sample key, so the choice is
deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IVF_FROM = 20_000  # samples from which the embedding index is an inverted file, not flat
NPROBE = 16


@dataclass
class Member:
    key: str
    clip_score: float | None
    area: float | None


def _rank(m: Member) -> tuple:
    """Sort key: the best sample first."""
    return (-(m.clip_score if m.clip_score is not None else -1e9), -(m.area or 0), m.key)


def groups(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the graph with edges (i, j): one label per node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    return connected_components(g, directed=False)[1]


def keep_best(members: list[Member], labels: np.ndarray) -> dict[int, int]:
    """index of each dropped member -> index of the member kept in its group."""
    by_group: dict[int, list[int]] = {}
    for idx, g in enumerate(labels):
        by_group.setdefault(int(g), []).append(idx)
    out = {}
    for idxs in by_group.values():
        if len(idxs) > 1:
            best = min(idxs, key=lambda x: _rank(members[x]))
            out.update({x: best for x in idxs if x != best})
    return out


def hash_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, bits) of distinct 64-bit hashes (uint64) within ``max_distance`` bits."""
    import faiss

    codes = np.ascontiguousarray(hashes.astype("<u8")).view(np.uint8).reshape(-1, 8)
    nhash = max_distance + 1
    index = faiss.IndexBinaryMultiHash(64, nhash, 64 // nhash)
    index.add(codes)
    lims, dist, ids = index.range_search(codes, max_distance + 1)  # distances below the radius
    i = np.repeat(np.arange(len(codes)), np.diff(lims).astype(np.int64))
    keep = ids != i
    return i[keep], ids[keep].astype(np.int64), dist[keep]


def embedding_pairs(emb: np.ndarray, threshold: float, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, cosine) among each row's ``k`` nearest neighbours with cosine >= threshold."""
    import faiss

    x = np.ascontiguousarray(emb, dtype=np.float32)
    faiss.normalize_L2(x)
    n, d = x.shape
    if n >= IVF_FROM:
        nlist = int(np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = NPROBE
    else:
        index = faiss.IndexFlatIP(d)
    index.add(x)
    sims, ids = index.search(x, min(k + 1, n))
    i = np.repeat(np.arange(n), sims.shape[1])
    j, s = ids.ravel(), sims.ravel()
    keep = (j >= 0) & (j != i) & (s >= threshold)
    return i[keep], j[keep].astype(np.int64), s[keep]


def near_duplicate_hashes(members: list[Member], hashes: list[int], max_distance: int) -> dict[str, tuple[str, int]]:
    """dropped key -> (kept key, bits apart), over the members' signed 64-bit hashes."""
    h = np.array([v & (2**64 - 1) for v in hashes], dtype=np.uint64)
    uniq, inverse = np.unique(h, return_inverse=True)
    ui, uj, _d = hash_pairs(uniq, max_distance)
    labels = groups(len(uniq), ui, uj)[inverse]  # a group of hashes; members with one hash share it
    dropped = keep_best(members, labels)
    return {members[a].key: (members[b].key, int(bin(int(h[a] ^ h[b])).count("1"))) for a, b in dropped.items()}


def semantic_duplicates(members: list[Member], emb: np.ndarray, threshold: float, k: int) -> dict[str, tuple[str, float]]:
    """dropped key -> (kept key, cosine to it) over the members' embeddings."""
    if len(members) < 2:
        return {}
    i, j, _s = embedding_pairs(emb, threshold, k)
    dropped = keep_best(members, groups(len(members), i, j))
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return {members[a].key: (members[b].key, float(x[a] @ x[b])) for a, b in dropped.items()}
