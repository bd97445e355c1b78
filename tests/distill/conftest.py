"""A tiny SSL teacher run (with heads) shared by the distillation tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEACHER_ARGS = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.layerscale_init=null",
    "heads.n_prototypes=64", "heads.hidden_dim=64", "heads.bottleneck_dim=16",
    "data.batch_size_per_gpu=8", "data.num_workers=0", "crops.n_local=0", "max_steps=2",
    "optim.iters_per_epoch=2", "optim.warmup_epochs=1", "log.every_n_steps=1",
    "log.progress=false", "eval.knn_every_n_steps=0", "checkpoint.every_n_steps=0",
]


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m dinosys.cli ARGS`` from this checkout (one thread), output captured."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "dinosys.cli", *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def teacher_run(builtin_data: Path, tmp_path_factory) -> Path:
    """A 2-step DINOv2 run on MNIST (32-wide, 2 blocks, 64 prototypes): checkpoint + export."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    res = run_cli("train", "mnist_tiny_cpu", "--out", str(run), *TEACHER_ARGS,
                  f"data.sources=[{{path: {builtin_data / 'mnist' / 'train'}}}]")
    assert res.returncode == 0, res.stderr[-3000:]
    return run
