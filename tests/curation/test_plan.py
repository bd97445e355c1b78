"""`dinosys-curate plan`: the cost model against the measured runs stored with its rates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curation.plan import RATES_FILE, index_dots, knn_dots, load_rates, plan


def test_every_rate_says_where_it_was_measured() -> None:
    rates = load_rates()["rates"]
    for name, rate in rates.items():
        assert rate["measured"] and rate["value"], name


@pytest.mark.parametrize("check", load_rates()["checks"], ids=lambda c: c["what"])
def test_model_predicts_the_measured_runs(check: dict) -> None:
    """Predicted CPU-seconds of the kNN search and the index build within ``tolerance`` (a
    factor) of what the run measured (CPU seconds, so a loaded machine still compares)."""
    rates = load_rates()["rates"]
    rate = rates["knn_dots_per_core_s"]["value"] / (check["dim"] / 256)
    index_rate = rates["index_dots_per_core_s"]["value"] / (check["dim"] / 256)
    n, tol = check["n"], check["tolerance"]
    predicted = {"knn_cpu_seconds": knn_dots(n, n, check["nlist"], check["nprobe"]) / rate,
                 "index_cpu_seconds": index_dots(n, check["nlist"]) / index_rate}
    for key, measured in check["measured"].items():
        ratio = predicted[key] / measured
        assert 1 / tol <= ratio <= tol, (check["what"], key, predicted[key], measured)


def test_plan_cli_prints_assumptions_and_json(repo_root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-m", "curation.cli", "plan", "--images", "1e9",
                           "--gpus", "160"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out == json.loads(json.dumps(plan(1e9, 160)))
    stages = [s["stage"] for s in out["stages"]]
    assert stages[:2] == ["ingest", "embed"] and "knn" in stages and stages[-1] == "shard"
    assert abs(out["total_gpu_hours"] - out["total_wall_hours"] * 160) < 1e-6
    assert "assumptions:" in proc.stdout and "rate knn_dots_per_core_s" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "curation.cli", "plan", "--images", "1e6",
                          "--gpus", "8", "--backbone", "nope"], env=env, capture_output=True,
                         text=True, timeout=120)
    lines = [ln for ln in bad.stderr.splitlines() if "error" in ln]
    assert bad.returncode == 2 and len(lines) == 1 and "nope" in lines[0]


def test_more_gpus_less_wall_time() -> None:
    a, b = plan(1e8, 16), plan(1e8, 64)
    assert b["total_wall_hours"] < a["total_wall_hours"]
    assert RATES_FILE.is_file()
