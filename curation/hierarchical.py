"""Hierarchical k-means with resampling and balanced top-down sampling (Vo et al. 2024,
"Automatic data curation for self-supervised learning: a clustering-based approach").

Level 1 clusters the data; level t clusters the centroids of level t-1. After each level's
k-means, ``n_resample`` resampling steps take the ``resample_size`` points nearest each
centroid and re-run k-means on that union (initialised from the current centroids), which moves
centroids from dense modes towards a uniform cover of the data. Balanced sampling then walks the
tree from the top, splitting the budget equally between children (capped at their size, the
remainder re-split among the others), and samples uniformly inside the finest clusters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from curation.config import ClusterConfig
from curation.kmeans import assign, kmeans_faiss, kmeans_torch

log = logging.getLogger(__name__)


@dataclass
class ClusterTree:
    """``labels[t]``: the level-t cluster of every data row (level 0 = finest);
    ``centroids[t]``: that level's centroids; ``parents[t]``: the level-(t+1) cluster of each
    level-t cluster."""

    labels: list[np.ndarray] = field(default_factory=list)
    centroids: list[np.ndarray] = field(default_factory=list)
    parents: list[np.ndarray] = field(default_factory=list)

    def paths(self) -> list[str]:
        """Top-down cluster path of every row, e.g. ``"3/17"`` (coarsest first)."""
        cols = [lab.astype(str) for lab in reversed(self.labels)]
        out = cols[0]
        for col in cols[1:]:
            out = np.char.add(np.char.add(out, "/"), col)
        return out.tolist()


def _kmeans(x: np.ndarray, k: int, cfg: ClusterConfig, seed: int,
            init: np.ndarray | None = None) -> np.ndarray:
    if cfg.backend == "torch":
        return kmeans_torch(x, k, cfg.n_iter, seed, cfg.chunk_size, init=init)[0]
    return kmeans_faiss(x, k, cfg.n_iter, seed, init=init)


def kmeans_with_resampling(x: np.ndarray, k: int, cfg: ClusterConfig, seed: int) -> np.ndarray:
    """One level: k-means, then ``cfg.n_resample`` resampling-clustering steps."""
    k = min(k, len(x))
    centroids = _kmeans(x, k, cfg, seed)
    for step in range(cfg.n_resample):
        labels, d2 = assign(x, centroids, cfg.chunk_size)
        order = np.lexsort((d2, labels))  # by cluster, nearest first
        starts = np.searchsorted(labels[order], np.arange(k))
        ends = np.searchsorted(labels[order], np.arange(k), side="right")
        take = np.concatenate([order[s: min(e, s + cfg.resample_size)]
                               for s, e in zip(starts, ends)])
        if len(take) < k:
            break
        centroids = _kmeans(x[np.sort(take)], k, cfg, seed + step + 1, init=centroids)
    return centroids


def train_tree(x: np.ndarray, cfg: ClusterConfig) -> ClusterTree:
    """The centroids of every level of ``cfg.levels`` (finest first) and each level's parents;
    ``labels`` stay empty (rows are assigned by :func:`assign_rows`, in slices if need be)."""
    tree = ClusterTree()
    data = np.asarray(x, dtype=np.float32)
    for level, k in enumerate(cfg.levels):
        k = min(k, len(data))
        centroids = kmeans_with_resampling(data, k, cfg, cfg.seed + 1000 * level)
        if level > 0:
            tree.parents.append(assign(data, centroids, cfg.chunk_size)[0])
        tree.centroids.append(centroids)
        log.info("level %d: %d clusters over %d points", level, k, len(data))
        data = centroids
    tree.parents.append(np.zeros(len(tree.centroids[-1]), dtype=np.int64))
    return tree


def level_labels(tree: ClusterTree, labels0: np.ndarray) -> list[np.ndarray]:
    """Every level's cluster of the rows whose finest cluster is ``labels0``."""
    out = [labels0]
    for parents in tree.parents[:-1]:
        out.append(parents[out[-1]])
    return out


def hierarchical_kmeans(x: np.ndarray, cfg: ClusterConfig) -> ClusterTree:
    """Cluster ``x`` with ``cfg.levels`` (finest first, e.g. [1000, 100, 10])."""
    tree = train_tree(x, cfg)
    labels0, _ = assign(np.asarray(x, dtype=np.float32), tree.centroids[0], cfg.chunk_size)
    tree.labels = level_labels(tree, labels0)
    return tree


def balanced_split(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Split ``budget`` over groups as equally as possible without exceeding any group's size
    (water-filling); deterministic, smallest group ids get the remainder first."""
    sizes = np.asarray(sizes, dtype=np.int64)
    alloc = np.zeros(len(sizes), dtype=np.int64)
    budget = int(min(budget, sizes.sum()))
    open_ = sizes > 0
    while budget > 0 and open_.any():
        idx = np.flatnonzero(open_)
        share = budget // len(idx)
        if share == 0:
            alloc[idx[:budget]] += 1
            break
        room = sizes[idx] - alloc[idx]
        give = np.minimum(room, share)
        alloc[idx] += give
        budget -= int(give.sum())
        open_ = alloc < sizes
    return alloc


def balanced_sample(tree: ClusterTree, target: int, seed: int = 0,
                    candidates: np.ndarray | None = None) -> np.ndarray:
    """Row indices of a balanced top-down sample of size ``min(target, #candidates)``."""
    rng = np.random.default_rng(seed)
    n = len(tree.labels[0])
    cand = np.ones(n, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool)
    n_levels = len(tree.labels)
    chosen: list[np.ndarray] = []

    def visit(level: int, rows: np.ndarray, budget: int) -> None:
        if budget <= 0 or len(rows) == 0:
            return
        if level < 0:
            chosen.append(np.sort(rng.choice(rows, size=min(budget, len(rows)), replace=False)))
            return
        labs = tree.labels[level][rows]
        groups, inverse = np.unique(labs, return_inverse=True)
        sizes = np.bincount(inverse)
        alloc = balanced_split(sizes, budget)
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        for g in range(len(groups)):
            if alloc[g]:
                visit(level - 1, rows[order[bounds[g]: bounds[g + 1]]], int(alloc[g]))

    visit(n_levels - 1, np.flatnonzero(cand), target)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
