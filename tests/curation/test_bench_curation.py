"""The curation benchmark at CI size (a real subprocess), and the fast CPU paths it measures:
the list-wise IVF search must return what ``faiss.IndexIVFFlat`` returns, and the blocked k-means
assignment what a brute-force argmin returns."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from curation import kmeans as km
from curation import knn as knn_mod
from curation.config import IndexConfig

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_curation.py"


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("self_join", [True, False])
@pytest.mark.parametrize("score_block", [1 << 24, 300])  # 300: many row and column blocks
@pytest.mark.parametrize("threads", [1, 3])  # 3: queries split over a thread pool
def test_list_wise_ivf_search_equals_faiss_ivfflat(monkeypatch: pytest.MonkeyPatch,
                                                   self_join: bool, score_block: int,
                                                   threads: int) -> None:
    monkeypatch.setattr(knn_mod, "_SCORE_BLOCK", score_block)
    xb = unit_rows(6000, 32, 0)
    xq = None if self_join else unit_rows(700, 32, 1)
    cfg = IndexConfig(kind="ivf", nlist=40, nprobe=5)
    quantizer = knn_mod.train_quantizer(xb, cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        faiss_threads = faiss.omp_get_max_threads()
        sims, ids = knn_mod.grouped_ivf_search(xq, xb, quantizer, 12, cfg.nprobe, batch=1000)
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (threads, faiss_threads)
    finally:
        torch.set_num_threads(before)
    ref = faiss.IndexIVFFlat(quantizer, 32, 40, faiss.METRIC_INNER_PRODUCT)
    ref.add(xb)
    ref.nprobe = cfg.nprobe
    ref_sims, ref_ids = ref.search(xb if xq is None else xq, 12)
    assert (ids == ref_ids).mean() > 0.999  # only exact ties may swap places
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    queries = xb if xq is None else xq
    np.testing.assert_allclose(sims, np.sum(queries[:, None, :] * xb[ids], -1), atol=1e-5)


def test_knn_ivf_pads_rows_with_fewer_probed_neighbours() -> None:
    xb = unit_rows(2000, 16, 2)
    xb.setflags(write=False)  # like a memory-mapped embedding file
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sims, ids = knn_mod.knn(xb, 64, IndexConfig(kind="ivf", nlist=200, nprobe=1))
    assert sims.shape == ids.shape == (2000, 64)
    assert (ids[:, 0] == np.arange(2000)).all()  # every row's home list holds itself
    missing = ids < 0
    assert missing.any() and np.isneginf(sims[missing]).all()
    assert np.isfinite(sims[~missing]).all()
    assert (np.diff(np.where(missing, -2.0, sims), axis=1) <= 1e-6).all()  # best first


@pytest.mark.parametrize("threads", [1, 3])  # 3: blocks spread over a thread pool
def test_blocked_kmeans_assignment_is_brute_force_argmin(monkeypatch: pytest.MonkeyPatch,
                                                         threads: int) -> None:
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((3000, 24)).astype(np.float32))
    c = torch.from_numpy(rng.standard_normal((37, 24)).astype(np.float32))
    d2 = torch.cdist(x.double(), c.double()) ** 2
    monkeypatch.setattr(km, "_CPU_SCORE_BLOCK", 37 * 100)  # 100-row blocks inside 700-row chunks
    sums = torch.zeros(37, 24)
    counts = torch.zeros(37)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        labels, dists = km._assign_torch(x, c, 700, sums, counts)
        assert torch.get_num_threads() == threads  # restored after the pool
    finally:
        torch.set_num_threads(before)
    assert (labels == d2.argmin(1)).all()
    np.testing.assert_allclose(dists.numpy(), d2.min(1).values.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(counts.numpy(), np.bincount(labels.numpy(), minlength=37))
    ref_sums = torch.zeros(37, 24).index_add_(0, labels, x)
    np.testing.assert_allclose(sums.numpy(), ref_sums.numpy(), atol=1e-4)


@pytest.mark.slow  # 30-45 s on 2 busy cores
def test_small_benchmark_run(repo_root: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--small", "--embed-images", "16",
                           "--verify-pairs", "800"],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["benchmark", "metric", "value"]  # the readable table first
    result = json.loads(lines[-1])
    dedup = result["dedup"]
    assert dedup["index"] == "ivf"  # CI size exercises the same search as the 1M run
    assert dedup["planted_pairs"] > 1000 and dedup["exact_pairs"] > 50
    assert dedup["recall_planted"] >= 0.99
    assert dedup["recall_vs_exact"] >= 0.99
    assert dedup["precision_planted"] >= 0.99
    assert dedup["planted_same_group"] >= 0.99
    assert 0 < dedup["removed"] < dedup["n"]
    assert 0 < dedup["knn_seconds"] <= dedup["seconds"]
    kmeans = result["kmeans"]
    assert kmeans["ours_seconds"] > 0 and kmeans["faiss_seconds"] > 0
    assert kmeans["ours_inertia"] <= 1.03 * kmeans["faiss_inertia"]
    embed = result["embed"]
    assert embed["images"] == 16 and embed["images_per_s"] > 0
    verify = result["verify"]
    assert verify["pairs"] == 800 and verify["pairs_per_s"] > 0
    assert verify["distinct_pairs_rejected"] >= 0.999
    assert verify["copies_grouped_with_original"] >= 0.9
