"""Similarities exactly on a threshold (0.5 and 0.75 are exact in float32): every rule is "strictly
above", for dedup edges, k-NN edges and decontamination touches. And a pair found from both sides
with different scores (approximate indexes are not symmetric) keeps its highest score."""

from __future__ import annotations

import numpy as np

from curation import dedup as dd

F32 = np.float32


def test_dedup_edge_exactly_on_the_threshold_does_not_join() -> None:
    edges = dd.Edges(np.array([0, 2]), np.array([1, 3]), np.array([0.75, 0.5], dtype=F32))
    assert edges.above(0.75).sim.tolist() == []
    assert edges.above(0.5).sim.tolist() == [0.75]
    res = dd.dedup(4, edges, 0.75)
    assert res.keep.all() and res.best_sim.tolist() == [0, 0, 0, 0]
    res = dd.dedup(4, edges, 0.5)
    assert res.keep.tolist() == [True, False, True, True]
    assert res.best_sim.tolist() == [0.75, 0.75, 0, 0]
    rows = dd.sweep(4, edges, [0.5, 0.75])
    assert [r["removed"] for r in rows] == [1, 0]


def test_knn_edge_exactly_on_the_threshold_is_dropped() -> None:
    # rows: self first, then one neighbour at exactly 0.5 or 0.75
    ids = np.array([[0, 1], [1, 0], [2, 3], [3, 2]])
    sims = np.array([[1.0, 0.5], [1.0, 0.5], [1.0, 0.75], [1.0, 0.75]], dtype=F32)
    edges = dd.knn_edges(sims, ids, 0.5)
    assert list(zip(edges.i.tolist(), edges.j.tolist())) == [(2, 3)]
    assert len(dd.knn_edges(sims, ids, 0.75)) == 0
    assert len(dd.knn_edges(sims, ids, 0.25)) == 2


def test_decontamination_touch_exactly_on_the_threshold_drops_nothing() -> None:
    no_edges = dd.Edges(np.array([], dtype=np.int64), np.array([], dtype=np.int64),
                        np.array([], dtype=F32))
    eval_ids = np.array([[0], [1]])
    eval_sims = np.array([[0.5], [0.75]], dtype=F32)
    at = dd.decontaminate(2, no_edges, eval_sims, eval_ids, 0.5)
    assert at.drop.tolist() == [False, True] and at.eval_match.tolist() == [-1, 1]
    assert dd.decontaminate(2, no_edges, eval_sims, eval_ids, 0.75).drop.tolist() == [False, False]


def test_knn_edge_seen_from_both_sides_keeps_the_highest_score() -> None:
    ids = np.array([[0, 1], [1, 0], [2, 0]])
    sims = np.array([[1.0, 0.75], [1.0, 0.875], [1.0, 0.5]], dtype=F32)
    edges = dd.knn_edges(sims, ids, 0.25)
    pairs = dict(zip(zip(edges.i.tolist(), edges.j.tolist()), edges.sim.tolist()))
    assert pairs == {(0, 1): 0.875, (0, 2): 0.5}
    # the pair survives a threshold between its two scores
    assert len(dd.knn_edges(sims, ids, 0.8)) == 1


def test_merged_edges_keep_each_pair_once_with_its_highest_score() -> None:
    """unique_edges merges the edge lists of k-NN parts: repeats across parts collapse."""
    i, j = np.array([0, 1, 0, 0]), np.array([1, 2, 1, 1])
    edges = dd.unique_edges(i, j, np.array([0.5, 0.75, 0.875, 0.625], dtype=F32))
    assert list(zip(edges.i.tolist(), edges.j.tolist(), edges.sim.tolist())) == [
        (0, 1, 0.875), (1, 2, 0.75)]
