"""Preemption: SIGUSR2 to a running `dinosys train` -> checkpoint + "preempted"; rerun resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-m", "dinosys.cli", "train", "mnist_tiny_cpu",
                             *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigusr2_checkpoints_and_resume_finishes(tiny_args, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--out", str(run), *tiny_args("checkpoint.every_n_steps=0")]
    proc = run_cli([*common, "max_steps=400"])
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "training never logged a step"
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "preempted" and 2 <= summary["step"] < 400
    step = summary["step"]
    assert (run / "checkpoints" / f"step_{step:08d}").is_dir()
    assert not (run / "export").exists()

    proc = run_cli([*common, f"max_steps={step + 2}"])
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["step"] == step + 2
    assert f"resumed from step {step}" in err
