"""Near-duplicate removal and decontamination on a k-NN similarity graph (DINOv2 LVD-142M).

Edges join images whose cosine similarity exceeds a threshold; connected components are copy
groups and one deterministic representative per group is kept. Decontamination builds the same
graph at a stricter (lower) threshold, adds edges to evaluation images, and drops every pool
component that touches an evaluation image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass
class Edges:
    """Undirected similarity edges ``i < j`` with their cosine similarity."""

    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray

    def above(self, threshold: float) -> Edges:
        """The edges with similarity strictly above ``threshold``."""
        keep = self.sim > threshold
        return Edges(self.i[keep], self.j[keep], self.sim[keep])

    def __len__(self) -> int:
        return len(self.i)


def knn_edges(sims: np.ndarray, ids: np.ndarray, threshold: float, offset: int = 0) -> Edges:
    """Undirected edges above ``threshold`` from a self k-NN result whose rows are the queries
    ``offset, offset + 1, ...`` (self-matches and repeats dropped; each pair once, with its
    highest score; sorted by ``(i, j)``)."""
    n, k = ids.shape
    rows = np.repeat(np.arange(offset, offset + n, dtype=np.int64), k)
    cols = ids.reshape(-1)
    s = sims.reshape(-1)
    keep = (cols >= 0) & (cols != rows) & (s > threshold)
    a, b, s = rows[keep], cols[keep], s[keep]
    i, j = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((-s, j, i))
    i, j, s = i[order], j[order], s[order]
    first = np.ones(len(i), dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return Edges(i[first], j[first], s[first].astype(np.float32))


def unique_edges(i: np.ndarray, j: np.ndarray, s: np.ndarray) -> Edges:
    """Each pair ``(i, j)`` (``i < j``) once with its highest score, sorted by ``(i, j)``."""
    order = np.lexsort((-s, j, i))
    i, j, s = i[order], j[order], s[order]
    first = np.ones(len(i), dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return Edges(i[first], j[first], s[first].astype(np.float32))


def components_blocked(n: int, edges: Edges, block: int = 1 << 22) -> np.ndarray:
    """The labels of :func:`components` without holding a sparse graph: label propagation by
    minimum over blocks of (memory-mapped) edges, with pointer jumping; memory is ``n`` labels
    plus one block, whatever the number of edges."""
    lab = np.arange(n, dtype=np.int64)
    while True:
        for lo in range(0, len(edges), block):
            a = np.asarray(edges.i[lo: lo + block])
            b = np.asarray(edges.j[lo: lo + block])
            la, lb = lab[a], lab[b]
            m = np.minimum(la, lb)
            np.minimum.at(lab, la, m)
            np.minimum.at(lab, lb, m)
        while True:  # every node points at its root: the smallest node of its tree
            nxt = lab[lab]
            if np.array_equal(nxt, lab):
                break
            lab = nxt
        stable = all(np.array_equal(lab[np.asarray(edges.i[lo: lo + block])],
                                    lab[np.asarray(edges.j[lo: lo + block])])
                     for lo in range(0, len(edges), block))
        if stable:
            break
    # roots are the smallest member of each component: number them in that order
    roots = np.flatnonzero(lab == np.arange(n))
    return np.searchsorted(roots, lab)


def components(n: int, edges: Edges) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes (labels 0..C-1, ordered by smallest
    member, so they are deterministic)."""
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges.i, edges.j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # relabel by first occurrence so the numbering does not depend on scipy internals
    _, first_idx, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first_idx), dtype=np.int64)
    rank[np.argsort(first_idx, kind="stable")] = np.arange(len(first_idx))
    return rank[inverse]


def representatives(labels: np.ndarray, priority: np.ndarray | None = None) -> np.ndarray:
    """Index of the representative of each node's component: the highest ``priority`` (ties and
    ``None``: the smallest index)."""
    n = len(labels)
    prio = np.zeros(n) if priority is None else np.asarray(priority, dtype=np.float64)
    order = np.lexsort((np.arange(n), -prio, labels))  # by label, then best priority, then index
    sorted_labels = labels[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    rep_of_label = np.empty(labels.max() + 1 if n else 0, dtype=np.int64)
    rep_of_label[sorted_labels[starts]] = order[starts]
    return rep_of_label[labels]


@dataclass
class DedupResult:
    """Per pool row: component label, representative row, whether it is kept."""

    labels: np.ndarray
    rep: np.ndarray
    keep: np.ndarray
    best_sim: np.ndarray  # highest similarity to another member of its component (0 if alone)

    @property
    def component_sizes(self) -> np.ndarray:
        """Size of every component."""
        return np.bincount(self.labels)


def label(n: int, edges: Edges, spill_edges: int | None = None) -> np.ndarray:
    """:func:`components`, or :func:`components_blocked` above ``spill_edges`` edges."""
    if spill_edges is not None and len(edges) > spill_edges:
        return components_blocked(n, edges)
    return components(n, edges)


def dedup(n: int, edges: Edges, threshold: float, priority: np.ndarray | None = None,
          spill_edges: int | None = None) -> DedupResult:
    """Copy groups at ``threshold`` and one kept representative per group."""
    strong = edges.above(threshold)
    labels = label(n, strong, spill_edges)
    rep = representatives(labels, priority)
    best = np.zeros(n, dtype=np.float32)
    np.maximum.at(best, strong.i, strong.sim)
    np.maximum.at(best, strong.j, strong.sim)
    return DedupResult(labels, rep, rep == np.arange(n), best)


@dataclass
class DecontamResult:
    """Pool rows removed because their component touches an evaluation image."""

    drop: np.ndarray  # bool per pool row
    eval_match: np.ndarray  # nearest evaluation row touching the component (-1 if none)
    eval_sim: np.ndarray  # similarity of that direct touch (for rows that touch directly)


def decontaminate(n: int, pool_edges: Edges, pool_to_eval_sims: np.ndarray,
                  pool_to_eval_ids: np.ndarray, threshold: float,
                  spill_edges: int | None = None) -> DecontamResult:
    """Drop whole pool components (graph at ``threshold``) that touch an evaluation image.

    ``pool_to_eval_*`` is each pool row's k-NN among the evaluation images.
    """
    labels = label(n, pool_edges.above(threshold), spill_edges)
    top_sim = pool_to_eval_sims[:, 0] if pool_to_eval_sims.size else np.full(n, -np.inf)
    top_id = pool_to_eval_ids[:, 0] if pool_to_eval_ids.size else np.full(n, -1)
    touches = (top_sim > threshold) & (top_id >= 0)
    bad_labels = np.unique(labels[touches])
    drop = np.isin(labels, bad_labels)
    # every dropped row names the evaluation image closest to any member of its component
    match = np.full(n, -1, dtype=np.int64)
    sim = np.where(touches, top_sim, np.float32(0)).astype(np.float32)
    if touches.any():
        best_row = np.full(labels.max() + 1, -1, dtype=np.int64)
        touch_rows = np.flatnonzero(touches)
        order = touch_rows[np.argsort(top_sim[touch_rows], kind="stable")]  # best last wins
        best_row[labels[order]] = order
        match[drop] = top_id[best_row[labels[drop]]]
    return DecontamResult(drop, match, sim)


def sweep(n: int, edges: Edges, thresholds: list[float],
          spill_edges: int | None = None) -> list[dict]:
    """Removed-image and component counts for each threshold (report), with the pair nearest
    above each threshold as an example."""
    rows = []
    for t in sorted(thresholds):
        strong = edges.above(t)
        labels = label(n, strong, spill_edges)
        n_comp = int(labels.max() + 1) if n else 0
        example = None
        if len(strong):
            e = int(np.argmin(strong.sim))
            example = (int(strong.i[e]), int(strong.j[e]), float(strong.sim[e]))
        rows.append({"threshold": float(t), "edges": len(strong), "kept": n_comp,
                     "removed": n - n_comp, "example": example})
    return rows
