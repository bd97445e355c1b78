"""Multi-rank evaluation with torchrun (gloo): extraction sharded, heads trained on the gathered
features; the result equals a single process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _eval(nproc: int, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29700 + nproc), "-m", "dinosys.cli", "eval", *args,
           "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


@pytest.mark.dist
def test_two_ranks_equal_one(tiny_export: Path, small_digits, tmp_path: Path) -> None:
    train, val = small_digits
    # 240 training images in batches of 50: 5 batches, so the ranks get 3 and 2
    args = ["linear", "--model", str(tiny_export), "--train", str(train), "--val", str(val),
            "--lrs", "0.01", "0.1", "--n-blocks", "1", "2", "--epochs", "3",
            "--extract-batch-size", "50"]
    one = _eval(1, tmp_path / "one.json", *args)
    two = _eval(2, tmp_path / "two.json", *args)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("one.json", "two.json"))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["grid"] == b["grid"] and a["metrics"] == b["metrics"]
    # one summary per job: rank 0 prints the JSON line, rank 1 nothing
    assert sum(line.startswith("{") for line in two.stdout.splitlines()) == 1
