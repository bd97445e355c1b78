"""`launch/submit.py clip` on the real local Slurm cluster: a tiny LiT run gets USR2 (Slurm's
preemption notice) -> checkpoint -> requeue -> resume; every step runs once, the losses and the
export equal an uninterrupted run of the same config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import slurm
from tests.clip.conftest import clip_yaml

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"
STEPS = 200  # enough steps left when USR2 arrives (a step takes a few ms)
OVERRIDES = [f"max_steps={STEPS}", "checkpoint.every_n_steps=1000", "log.every_n_steps=1"]


def _env() -> dict[str, str]:
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # one thread in both runs: the same float reduction order, so the losses can be equal
    return {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}


def _losses(run: Path) -> dict[int, float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slurm
@pytest.mark.slow
def test_lit_requeues_on_usr2_resumes_exactly_and_exports(tmp_path, builtin_data, tiny_export):
    config = clip_yaml(tmp_path, builtin_data / "shards" / "mnist",
                       f"{{locked: {tiny_export}, trainable_blocks: 1}}")
    straight = subprocess.run([sys.executable, "-m", "dinosys.cli", "clip", str(config), "--out",
                               str(tmp_path / "straight"), *OVERRIDES], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "slurm"
    res = subprocess.run([sys.executable, str(SUBMIT), "clip", "--partition", "debug",
                          "--timeout-min", "10", "--max-requeues", "2", "--out", str(run), "--",
                          str(config), *OVERRIDES], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    job_id = json.loads(res.stdout.splitlines()[-1])["job_id"]
    try:
        deadline = time.time() + 400  # the shared cluster may be busy with other jobs
        while len(_losses(run)) < 3 and time.time() < deadline:
            time.sleep(0.2)
        assert len(_losses(run)) >= 3, "the job never trained 3 steps"
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        fields = slurm.wait_for_job(job_id, timeout_s=600, start_requeued_now=True)
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    logs = sorted((run / "submitit").glob("*_log.err"))
    assert fields["JobState"] == "COMPLETED", (fields, logs[0].read_text()[-3000:])
    assert fields["Restarts"] == "1"  # preempted once, requeued, resumed
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x]
    assert steps == list(range(1, STEPS + 1))  # every step exactly once
    assert _losses(run) == pytest.approx(_losses(tmp_path / "straight"), abs=0)
    a = load_file(str(run / "export" / "clip" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "export" / "clip" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "requeued Slurm job" in (run / "submitit" / f"{job_id}_0_log.err").read_text()
