"""Retrieval of pool images that resemble a curated query set (DINOv2 LVD-142M).

Sample-based: the ``k`` nearest pool images of every query image. Cluster-based: pool clusters
that hold more than ``min_queries`` query images contribute up to ``per_cluster`` images each.
A per-source cap bounds how much any single pool source contributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curation.config import IndexConfig, RetrieveConfig
from curation.kmeans import assign
from curation.knn import knn


@dataclass
class Retrieval:
    """Per pool row: selected or not, why (``sample``/``cluster``/``""``), the best query
    similarity (sample-based) and the query count of its cluster (cluster-based)."""

    selected: np.ndarray
    reason: np.ndarray
    similarity: np.ndarray
    capped: np.ndarray  # retrieved but removed by the per-source cap


def sample_knn(pool: np.ndarray, queries: np.ndarray, k: int,
               offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` pool rows (numbered from ``offset``) of every query: one slice of the
    sample-based retrieval; :func:`merge_topk` combines slices."""
    if not len(pool) or not len(queries):
        return (np.full((len(queries), k), -np.inf, np.float32),
                np.full((len(queries), k), -1, np.int64))
    sims, ids = knn(pool, k, IndexConfig(kind="flat", use_gpu=False), xq=queries)
    return sims, np.where(ids >= 0, ids + offset, -1)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]],
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of per-slice top-k lists (ties: the smaller pool row first)."""
    sims = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    key_ids = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
    order = np.lexsort((key_ids, -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def retrieve(n: int, queries: np.ndarray, pool_labels: np.ndarray,
             centroids: np.ndarray, pool_sources: np.ndarray, cfg: RetrieveConfig,
             topk: tuple[np.ndarray, np.ndarray], seed: int = 0) -> Retrieval:
    """Select among ``n`` pool rows for the query set. ``pool_labels``/``centroids``: the finest
    clusters; ``topk``: every query's nearest pool rows (:func:`sample_knn`, :func:`merge_topk`).
    """
    score = np.full(n, -np.inf, dtype=np.float32)  # ranking score for the per-source cap
    reason = np.full(n, "", dtype=object)
    similarity = np.zeros(n, dtype=np.float32)
    rng = np.random.default_rng(seed)
    if cfg.mode in ("sample", "both") and len(queries) and n:
        sims, ids = topk
        flat_ids, flat_sims = ids.reshape(-1), sims.reshape(-1)
        ok = flat_ids >= 0
        np.maximum.at(similarity, flat_ids[ok], flat_sims[ok])
        hit = np.zeros(n, dtype=bool)
        hit[flat_ids[ok]] = True
        reason[hit] = "sample"
        score[hit] = 1.0 + similarity[hit]  # sample-based picks rank above cluster-based ones
    if cfg.mode in ("cluster", "both") and len(queries) and n:
        q_labels, _ = assign(queries, centroids)
        q_count = np.bincount(q_labels, minlength=len(centroids))
        for c in np.flatnonzero(q_count > cfg.min_queries):
            members = np.flatnonzero(pool_labels == c)
            if len(members) > cfg.per_cluster:
                members = np.sort(rng.choice(members, cfg.per_cluster, replace=False))
            fresh = members[reason[members] == ""]
            reason[fresh] = "cluster"
            score[fresh] = np.maximum(score[fresh], q_count[c] / max(1, len(queries)))
    selected = reason != ""
    capped = np.zeros(n, dtype=bool)
    if cfg.per_source_cap is not None:
        for src in np.unique(pool_sources[selected]):
            rows = np.flatnonzero(selected & (pool_sources == src))
            if len(rows) > cfg.per_source_cap:
                order = rows[np.lexsort((rows, -score[rows]))]
                capped[order[cfg.per_source_cap:]] = True
        selected &= ~capped
    return Retrieval(selected, reason.astype(str), similarity, capped)
