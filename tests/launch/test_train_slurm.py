"""End to end on the real local Slurm cluster: `dinosys train` through launch/submit.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import read_steps, wait_for

from launch import slurm

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"


def tiny_overrides(data: Path, steps: int) -> list[str]:
    """mnist_tiny_cpu shrunk to seconds per step on 2 shared CPU cores."""
    return [f"max_steps={steps}", f"data.sources=[{{path: {data / 'mnist' / 'train'}}}]",
            "data.batch_size_per_gpu=8", "data.num_workers=0", "log.every_n_steps=1",
            "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "crops.n_local=2",
            "heads.n_prototypes=128", "heads.hidden_dim=64", "heads.bottleneck_dim=32",
            "checkpoint.every_n_steps=1000", "log.progress=false"]


def _submit(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *argv], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def _queued_jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return out.split()


@pytest.mark.slurm
def test_errors_exit_2_before_anything_is_queued(tmp_path) -> None:
    before = _queued_jobs()
    unknown = _submit("train", "--partition", "no-such-partition", "--out", str(tmp_path / "a"),
                      "--", "mnist_tiny_cpu")
    assert unknown.returncode == 2
    assert "unknown Slurm partition 'no-such-partition'; this cluster has: debug" in unknown.stderr
    bad = _submit("train", "--partition", "debug", "--out", str(tmp_path / "b"), "--",
                  "mnist_tiny_cpu", "optim.lr=1")
    assert bad.returncode == 2 and "unknown config key 'optim.lr'" in bad.stderr
    assert _queued_jobs() == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.dist
def test_two_task_training_requeues_on_usr2_and_finishes_every_step_once(
        tmp_path, builtin_data) -> None:
    run = tmp_path / "run"
    steps = 10
    res = _submit("train", "--gpus-per-node", "0", "--tasks-per-node", "2", "--partition",
                  "debug", "--timeout-min", "10", "--max-requeues", "2", "--out", str(run),
                  "--", "mnist_tiny_cpu", *tiny_overrides(builtin_data, steps))
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.splitlines()[-1])
    job_id = info["job_id"]
    assert info["run_dir"] == str(run) and info["tasks"] == 2
    try:
        wait_for(lambda: len(read_steps(run)) >= 3, 240, "3 training steps")
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        fields = slurm.wait_for_job(job_id, timeout_s=300, start_requeued_now=True)
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    logs = sorted((run / "submitit").glob("*_log.err"))
    assert fields["JobState"] == "COMPLETED", (fields, logs[0].read_text()[-3000:])
    assert fields["Restarts"] == "1"
    logged = [r["step"] for r in read_steps(run)]
    assert logged == list(range(1, steps + 1)), logged  # every step exactly once
    result = json.loads((run / "submission" / "job.json").read_text())
    assert result["job_id"] == job_id and result["jobs"][0]["tasks"] == 2
    sub = run / "submission"
    assert "--ntasks-per-node=2" in (sub / "sbatch.sh").read_text()
    assert "max_steps: 10" in (sub / "config.yaml").read_text()
    assert "launch/submit.py train" in (sub / "command.txt").read_text()
    assert (run / "config.yaml").is_file()
    assert (run / "export" / "teacher" / "model.safetensors").is_file()
    # the first run stopped at the preemption checkpoint, the second resumed from it
    err0 = (run / "submitit" / f"{job_id}_0_log.err").read_text()
    assert "requeued Slurm job" in err0 and "restart 1" in err0
    assert "2 ranks on cpu" in err0  # both Slurm tasks in one process group


@pytest.mark.slow
@pytest.mark.dist
def test_local_runs_the_same_two_task_job(tmp_path, builtin_data) -> None:
    run = tmp_path / "run"
    res = _submit("train", "--local", "--tasks-per-node", "2", "--out", str(run), "--",
                  "mnist_tiny_cpu", *tiny_overrides(builtin_data, 3))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["status"] == "finished" and summary["result"]["world_size"] == 2
    assert [r["step"] for r in read_steps(run)] == [1, 2, 3]
    assert (run / "submission" / "config.yaml").is_file()
    assert len(list((run / "submitit").glob("*_log.out"))) == 2  # one log per task


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.dist
def test_a_non_ssl_task_requeues_on_usr2_through_the_same_path(tmp_path, builtin_data) -> None:
    """The toy task (no SSL parts) on 2 Slurm tasks: USR2 -> collective checkpoint -> requeue
    -> every step once. clip and distill jobs take exactly this path (launch/jobs.py)."""
    # enough steps that USR2 lands mid-run: with 8, a quiet machine finished them all before
    # the signal arrived (Restarts 0)
    run, steps = tmp_path / "run", 400
    config = tmp_path / "toy.yaml"
    config.write_text(f"""\
task: toy
model: {{arch: vit_tiny, img_size: 28, patch_size: 14, embed_dim: 32, depth: 2, num_heads: 2}}
data: {{sources: [{{path: {builtin_data / 'mnist' / 'train'}}}], batch_size_per_gpu: 8,
        num_workers: 0}}
max_steps: {steps}
log: {{every_n_steps: 1, progress: false}}
checkpoint: {{every_n_steps: 1000}}
""")
    res = _submit("train", "--gpus-per-node", "0", "--tasks-per-node", "2", "--partition",
                  "debug", "--timeout-min", "10", "--max-requeues", "2", "--out", str(run),
                  "--", str(config))
    assert res.returncode == 0, res.stderr
    job_id = json.loads(res.stdout.splitlines()[-1])["job_id"]
    try:
        wait_for(lambda: len(read_steps(run)) >= 2, 240, "2 training steps")
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        fields = slurm.wait_for_job(job_id, timeout_s=300, start_requeued_now=True)
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    logs = sorted((run / "submitit").glob("*_log.err"))
    assert fields["JobState"] == "COMPLETED", (fields, logs[0].read_text()[-3000:])
    assert fields["Restarts"] == "1"
    assert [r["step"] for r in read_steps(run)] == list(range(1, steps + 1))
    assert (run / "export" / "backbone" / "model.safetensors").is_file()
