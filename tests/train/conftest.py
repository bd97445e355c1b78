"""Tiny training recipe shared by the trainer tests (seconds per step on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinosys.config import load_config
from dinosys.train.tasks.ssl import SSLConfig

TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.layerscale_init=null",
    "heads.n_prototypes=64", "heads.hidden_dim=64", "heads.bottleneck_dim=16",
    "data.batch_size_per_gpu=8", "data.num_workers=0", "crops.n_local=2",
    "optim.iters_per_epoch=2", "optim.warmup_epochs=1", "log.every_n_steps=1",
    "log.progress=false", "eval.knn_every_n_steps=0",
]


def tiny_overrides(builtin_data: Path, *extra: str) -> list[str]:
    """mnist_tiny_cpu shrunk to a few-second run on the cached builtin MNIST."""
    return [*TINY, f"data.sources=[{{path: {builtin_data / 'mnist' / 'train'}}}]", *extra]


@pytest.fixture
def tiny_cfg(builtin_data: Path):  # type: ignore[no-untyped-def]
    """Factory: ``tiny_cfg("max_steps=4", ...)`` -> SSLConfig."""

    def make(*extra: str) -> SSLConfig:
        return load_config(SSLConfig, "mnist_tiny_cpu", tiny_overrides(builtin_data, *extra),
                           kind="train")

    return make


@pytest.fixture
def tiny_args(builtin_data: Path):  # type: ignore[no-untyped-def]
    """Factory: ``tiny_args("max_steps=3")`` -> the override list (for CLI runs)."""
    return lambda *extra: tiny_overrides(builtin_data, *extra)
