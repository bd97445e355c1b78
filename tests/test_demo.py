"""`dinosys demo` end to end at a tiny size (the full recipe runs for minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinosys.demo import run_demo

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "heads.n_prototypes=64",
        "heads.hidden_dim=64", "heads.bottleneck_dim=16", "data.batch_size_per_gpu=8",
        "data.num_workers=0", "max_steps=3", "log.progress=false", "eval.knn_every_n_steps=0"]


@pytest.mark.slow
def test_demo_trains_and_evaluates(builtin_data: Path, tmp_path: Path) -> None:
    summary = run_demo(tmp_path / "run", builtin_data, overrides=TINY)
    assert summary["status"] == "finished" and summary["steps"] == 3
    assert summary["n_train"] == 4000 and summary["n_val"] == 1000
    for key in ("knn_top1", "knn_top1_random_init"):
        assert set(summary[key]) == {"10", "20"}
        assert all(0.0 <= v <= 1.0 for v in summary[key].values())
    written = json.loads((tmp_path / "run" / "demo_summary.json").read_text())
    assert written == summary
    assert (tmp_path / "run" / "export" / "teacher" / "model.safetensors").is_file()
