"""Unit tests of the curation stages on synthetic embeddings with planted duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from curation import dedup as dd
from curation.config import ClusterConfig, IndexConfig, RetrieveConfig
from curation.hierarchical import balanced_sample, balanced_split, hierarchical_kmeans
from curation.kmeans import inertia, kmeans_faiss, kmeans_torch
from curation.knn import knn
from curation.retrieve import merge_topk, retrieve, sample_knn


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(n: int = 3000, d: int = 64, groups: int = 100, size: int = 3, noise: float = 0.25,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered background plus ``groups`` planted copy groups; label -1 = no copies."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, d))
    x = centers[rng.integers(0, 20, n)] * 0.3 + rng.standard_normal((n, d))
    label = np.full(n, -1)
    for g in range(groups):
        base = g * size
        label[base: base + size] = g
        x[base + 1: base + size] = x[base] + noise * rng.standard_normal((size - 1, d))
    return unit(x), label


def planted_pairs(label: np.ndarray) -> set[tuple[int, int]]:
    out = set()
    for g in np.unique(label[label >= 0]):
        members = np.flatnonzero(label == g)
        out |= {(int(a), int(b)) for a in members for b in members if a < b}
    return out


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_knn_backends_find_planted_pairs(kind: str) -> None:
    x, label = planted()
    sims, ids = knn(x, 16, IndexConfig(kind=kind, nprobe=8, pq_m=16, rerank_k=64))
    edges = dd.knn_edges(sims, ids, 0.6)
    found = set(zip(edges.i.tolist(), edges.j.tolist()))
    truth = planted_pairs(label)
    assert len(found & truth) / len(truth) >= 0.99
    a, b = np.nonzero(np.triu(x @ x.T, 1) > 0.6)
    exact = set(zip(a.tolist(), b.tolist()))
    assert found <= exact and len(found) >= 0.99 * len(exact)
    # reported scores are exact dot products, also for IVF-PQ (re-ranked)
    np.testing.assert_allclose(edges.sim, np.sum(x[edges.i] * x[edges.j], 1), atol=1e-5)


def test_edges_components_representatives() -> None:
    sims = np.array([[1.0, 0.9, 0.1], [1.0, 0.9, 0.2], [1.0, 0.65, 0.1], [1.0, 0.65, 0.1],
                     [1.0, 0.0, 0.0]], dtype=np.float32)
    ids = np.array([[0, 1, 4], [1, 0, 4], [2, 3, 0], [3, 2, 0], [4, -1, -1]])
    edges = dd.knn_edges(sims, ids, 0.5)
    assert sorted(zip(edges.i.tolist(), edges.j.tolist())) == [(0, 1), (2, 3)]
    res = dd.dedup(5, edges, 0.6)
    assert res.labels.tolist() == [0, 0, 1, 1, 2]
    assert res.keep.tolist() == [True, False, True, False, True]
    # higher threshold splits the weaker group; priority picks the larger image
    res = dd.dedup(5, edges, 0.7, priority=np.array([1, 5, 0, 0, 0]))
    assert res.keep.tolist() == [False, True, True, True, True]
    assert res.rep.tolist() == [1, 1, 2, 3, 4]


def test_dedup_transitive_groups_and_sweep() -> None:
    x, label = planted(n=2000, groups=50, size=4)
    sims, ids = knn(x, 16, IndexConfig(kind="flat"))
    edges = dd.knn_edges(sims, ids, 0.4)
    res = dd.dedup(len(x), edges, 0.6)
    for g in range(50):
        members = np.flatnonzero(label == g)
        assert len(set(res.labels[members])) == 1
        assert res.keep[members].sum() == 1 and res.keep[members[0]]  # smallest id kept
    assert res.keep[label < 0].all()
    rows = dd.sweep(len(x), edges, [0.4, 0.6, 0.9])
    removed = [r["removed"] for r in rows]
    assert removed == sorted(removed, reverse=True) and removed[1] == 150


def test_decontamination_drops_whole_components() -> None:
    x, label = planted(n=1000, groups=20, size=3)
    sims, ids = knn(x, 16, IndexConfig(kind="flat"))
    edges = dd.knn_edges(sims, ids, 0.45)
    rng = np.random.default_rng(1)
    eval_set = unit(x[[0, 30]] + 0.2 * rng.standard_normal((2, x.shape[1])))  # near groups 0, 10
    eval_set = np.vstack([eval_set, unit(rng.standard_normal((5, x.shape[1])))])
    pe_s, pe_i = knn(eval_set, 7, IndexConfig(kind="flat"), xq=x)
    con = dd.decontaminate(len(x), edges, pe_s, pe_i, 0.45)
    dropped = set(np.flatnonzero(con.drop).tolist())
    assert {0, 1, 2, 30, 31, 32} <= dropped
    assert len(dropped) < 20
    assert set(con.eval_match[[0, 1, 2]].tolist()) == {0}
    assert set(con.eval_match[[30, 31, 32]].tolist()) == {1}


def test_kmeans_torch_matches_faiss_quality() -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((30, 16)) * 4
    x = (centers[rng.integers(0, 30, 6000)] + rng.standard_normal((6000, 16))).astype(np.float32)
    c_t, lab = kmeans_torch(x, 30, n_iter=15, seed=0, chunk_size=1000)
    c_f = kmeans_faiss(x, 30, n_iter=15, seed=0)
    assert c_t.shape == (30, 16) and lab.shape == (6000,)
    assert inertia(x, c_t) <= 1.05 * inertia(x, c_f)
    assert inertia(x, c_t) < 2.0 * 16  # near the noise variance (16): most true clusters found
    c_t2, _ = kmeans_torch(x, 30, n_iter=15, seed=0, chunk_size=777)
    np.testing.assert_allclose(c_t, c_t2, atol=1e-4)  # chunking does not change the result


def test_balanced_split_water_filling() -> None:
    assert balanced_split(np.array([1, 10, 10]), 12).tolist() == [1, 6, 5]
    assert balanced_split(np.array([2, 2]), 10).tolist() == [2, 2]
    assert balanced_split(np.array([5, 5, 5]), 0).tolist() == [0, 0, 0]


def test_hierarchical_kmeans_and_balanced_sampling() -> None:
    rng = np.random.default_rng(0)
    centers = unit(rng.standard_normal((8, 32)))
    sizes = [2000, 1000, 400, 200, 100, 50, 30, 20]  # long-tailed concepts
    x = unit(np.vstack([c + 0.15 * rng.standard_normal((s, 32)) for c, s in zip(centers, sizes)]))
    concept = np.repeat(np.arange(8), sizes)
    tree = hierarchical_kmeans(x, ClusterConfig(levels=[40, 8], n_iter=10, n_resample=1))
    assert len(tree.labels) == 2 and len(tree.centroids[1]) == 8
    assert len(tree.paths()) == len(x) and tree.paths()[0].count("/") == 1
    picked = balanced_sample(tree, 800, seed=0)
    assert len(picked) == 800 and len(np.unique(picked)) == 800
    share = np.bincount(concept[picked], minlength=8) / 800
    natural = np.array(sizes) / sum(sizes)
    # balancing flattens the long tail: the head shrinks, the tail grows
    assert share[0] < 0.6 * natural[0]
    assert share[5:].sum() > 1.5 * natural[5:].sum()


def test_retrieval_sample_cluster_and_source_cap() -> None:
    x, _ = planted(n=2000, groups=0)
    rng = np.random.default_rng(3)
    queries = unit(x[:10] + 0.05 * rng.standard_normal((10, x.shape[1])))
    from curation.kmeans import assign

    cents = kmeans_faiss(x, 20, n_iter=10)
    labels, _ = assign(x, cents)
    sources = np.where(np.arange(2000) % 2 == 0, "a", "b")
    topk = sample_knn(x, queries, 3)
    # slices of the pool merged give the same top-k as the whole pool
    sliced = merge_topk([sample_knn(x[lo: lo + 700], queries, 3, lo)
                         for lo in range(0, 2000, 700)], 3)
    np.testing.assert_array_equal(sliced[1], topk[1])
    res = retrieve(len(x), queries, labels, cents, sources, RetrieveConfig(mode="sample", k=3),
                   topk)
    assert res.selected[:10].all() and res.selected.sum() <= 30
    assert (res.reason[:10] == "sample").all()
    res = retrieve(len(x), queries, labels, cents, sources,
                   RetrieveConfig(mode="cluster", min_queries=0, per_cluster=50), topk)
    hit = np.unique(assign(queries, cents)[0])
    assert set(np.unique(labels[res.selected])) == set(hit)
    capped = retrieve(len(x), queries, labels, cents, sources,
                      RetrieveConfig(mode="both", k=3, min_queries=0, per_cluster=50,
                                     per_source_cap=7), topk)
    for s in ("a", "b"):
        assert (capped.selected & (sources == s)).sum() <= 7
    assert capped.capped.sum() > 0
