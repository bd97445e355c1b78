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


def retrieve(pool: np.ndarray, queries: np.ndarray, pool_labels: np.ndarray,
             centroids: np.ndarray, pool_sources: np.ndarray, cfg: RetrieveConfig,
             index_cfg: IndexConfig, seed: int = 0) -> Retrieval:
    """Select pool rows for the query set. ``pool_labels``/``centroids``: the finest clusters."""
    n = len(pool)
    score = np.full(n, -np.inf, dtype=np.float32)  # ranking score for the per-source cap
    reason = np.full(n, "", dtype=object)
    similarity = np.zeros(n, dtype=np.float32)
    rng = np.random.default_rng(seed)
    if cfg.mode in ("sample", "both") and len(queries) and n:
        sims, ids = knn(pool, cfg.k, index_cfg, xq=queries, seed=seed)
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
