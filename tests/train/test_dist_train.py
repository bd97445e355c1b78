"""Two real ranks (torchrun, gloo on CPU): FSDP2 EMA on shards, and `dinosys train`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.dist
def test_ema_on_fsdp_shards_matches_full_tensors() -> None:
    proc = torchrun([str(HERE / "_ema_shards_check.py")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EMA_SHARDS_OK" in proc.stdout


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_two_ranks_train(tiny_args, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = tiny_args("max_steps=3", "checkpoint.every_n_steps=2")
    proc = torchrun(["-m", "dinosys.cli", "train", "mnist_tiny_cpu", "--out", str(run),
                     *overrides])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # one summary per job, printed by rank 0
    assert all(s["status"] == "finished" and s["step"] == 3 for s in summaries)
    assert {s["world_size"] for s in summaries} == {2}
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".jsonl") == ["metrics.jsonl"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # rank 0 logs, once
    assert (run / "checkpoints" / "step_00000002").is_dir()
    assert (run / "export" / "teacher" / "model.safetensors").is_file()
