"""Distributed k-means with 2 real gloo ranks equals the single-process result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from curation.kmeans import kmeans_torch

WORKER = Path(__file__).with_name("kmeans_worker.py")


@pytest.mark.dist
def test_two_rank_kmeans_equals_single_process(tmp_path: Path, repo_root: Path) -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((12, 24)) * 3
    x = (centers[rng.integers(0, 12, 3001)] + rng.standard_normal((3001, 24))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(tmp_path / "x.npy"), str(tmp_path / "out.npz")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    # every rank ends with the same centroids
    np.testing.assert_allclose(out["centroids"], out["other"], atol=1e-6)
    # and the same result as one process over all rows (sampling is by global row index)
    single_c, single_l = kmeans_torch(x.astype(np.float16), 12, n_iter=8, seed=3, chunk_size=250)
    np.testing.assert_allclose(out["centroids"], single_c, atol=1e-3)
    assert (out["labels"] == single_l).mean() > 0.999
