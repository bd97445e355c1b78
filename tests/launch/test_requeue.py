"""Preemption on the real local Slurm cluster with a trivial checkpointing job (2 tasks)."""

from __future__ import annotations

import json
import subprocess

import pytest
from launch_helpers import counting_job, read_steps, submit, wait_for

from launch import slurm

pytestmark = [pytest.mark.slurm, pytest.mark.dist]


def _signal(job_id: str) -> None:
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)


def test_usr2_requeues_and_resumes_without_lost_or_repeated_steps(tmp_path) -> None:
    out = tmp_path / "run"
    info = submit(counting_job(total_steps=16, step_s=0.25),
                  ["--gpus-per-node", "0", "--tasks-per-node", "2", "--partition", "debug",
                   "--timeout-min", "5", "--max-requeues", "2", "--out", str(out)])
    job_id = info["job_id"]
    assert info["run_dir"] == str(out) and info["tasks"] == 2
    sub = out / "submission"
    assert "#SBATCH --signal=USR2@90" in (sub / "sbatch.sh").read_text()
    assert "#SBATCH --requeue" in (sub / "sbatch.sh").read_text()
    assert json.loads((sub / "job.json").read_text())["job_id"] == job_id
    wait_for(lambda: len(read_steps(out)) >= 4, 90, "4 steps before the signal")
    _signal(job_id)
    # start_requeued_now: lift the hold Slurm puts on a requeued job
    fields = slurm.wait_for_job(job_id, timeout_s=120, start_requeued_now=True)
    assert fields["JobState"] == "COMPLETED", fields
    assert fields["Restarts"] == "1"
    steps = read_steps(out)
    assert [s["step"] for s in steps] == list(range(1, 17))  # each step once, in order
    restarts = [s["restart"] for s in steps]
    first_rerun = restarts.index(1)
    assert 4 <= first_rerun < 16 and set(restarts[first_rerun:]) == {1}
    assert all(s["world_size"] == 2 and s["job"] == job_id for s in steps)
    assert json.loads((out / "ckpt.json").read_text())["step"] == first_rerun


def test_no_requeue_past_max_requeues(tmp_path) -> None:
    out = tmp_path / "run"
    info = submit(counting_job(total_steps=200, step_s=0.2),
                  ["--gpus-per-node", "0", "--tasks-per-node", "2", "--partition", "debug",
                   "--timeout-min", "5", "--max-requeues", "0", "--out", str(out)])
    wait_for(lambda: len(read_steps(out)) >= 2, 90, "2 steps before the signal")
    _signal(info["job_id"])
    fields = slurm.wait_for_job(info["job_id"], timeout_s=90)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0", fields
    steps = read_steps(out)
    assert steps[-1]["step"] < 200 and {s["restart"] for s in steps} == {0}
    log = (out / "submitit" / f"{info['job_id']}_0_log.err").read_text()
    assert "not requeuing" in log
    step = steps[-1]["step"]
    assert (f"preempted at step {step}: checkpoint saved; not requeued (restart 0 of at most 0)"
            in log)
    assert "Job completed successfully" not in log and "job task ended: preempted" in log
