"""`launch/submit.py distill` on the real local Slurm cluster: USR2 -> collective checkpoint ->
requeue -> resume, every step once; bad input exits 2 before anything is queued."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import slurm

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"
STUDENTS = ("students=[{name: s, model: {arch: vit_tiny, img_size: 28, "
            "patch_size: 14, embed_dim: 24, depth: 1, num_heads: 2, layerscale_init: null}, "
            "heads: {hidden_dim: 32, bottleneck_dim: 16}}, {name: b, model: "
            "{arch: vit_tiny, img_size: 28, patch_size: 14, embed_dim: 32, depth: 1, "
            "num_heads: 2, layerscale_init: null}, heads: {hidden_dim: 32, bottleneck_dim: 16}}]")


def _submit(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *argv], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if '"s/loss"' in line]


@pytest.mark.slurm
def test_bad_distill_config_exits_2_before_queueing(tmp_path: Path) -> None:
    res = _submit("distill", "--partition", "debug", "--out", str(tmp_path / "a"), "--",
                  "mnist_demo_cpu", "loss.mode=bogus")
    assert res.returncode == 2 and "loss.mode" in res.stderr, res.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.dist
def test_two_task_distillation_requeues_on_usr2_and_finishes_every_step_once(
        tmp_path: Path, teacher_run: Path, builtin_data: Path) -> None:
    run, steps = tmp_path / "run", 60  # enough steps left when USR2 arrives
    res = _submit("distill", "--gpus-per-node", "0", "--tasks-per-node", "2", "--partition",
                  "debug", "--timeout-min", "10", "--max-requeues", "2", "--out", str(run),
                  "--", "mnist_demo_cpu", f"teacher.path={teacher_run}", STUDENTS,
                  f"max_steps={steps}", f"data.sources=[{{path: {builtin_data}/mnist/train}}]",
                  "data.batch_size_per_gpu=4", "data.num_workers=0", "log.every_n_steps=1",
                  "log.progress=false", "checkpoint.every_n_steps=1000", "eval.knn_train=null",
                  "eval.knn_val=null", "export_formats=[native]", "loss.feature_weight=0.0")
    assert res.returncode == 0, res.stderr
    job_id = json.loads(res.stdout.splitlines()[-1])["job_id"]
    try:
        deadline = time.time() + 300
        while len(_steps(run)) < 3 and time.time() < deadline:
            time.sleep(1)
        assert len(_steps(run)) >= 3, "the job never trained 3 steps"
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        fields = slurm.wait_for_job(job_id, timeout_s=400, start_requeued_now=True)
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    logs = sorted((run / "submitit").glob("*_log.err"))
    assert fields["JobState"] == "COMPLETED", (fields, logs[0].read_text()[-3000:])
    assert fields["Restarts"] == "1"
    assert _steps(run) == list(range(1, steps + 1))  # every step exactly once
    for name in ("s", "b"):
        assert (run / "export" / name / "model.safetensors").is_file()
    err0 = (run / "submitit" / f"{job_id}_0_log.err").read_text()
    assert "requeued Slurm job" in err0
