"""A single-task evaluation job on the real local Slurm cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch import slurm

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"


@pytest.mark.slurm
def test_knn_eval_job_writes_its_result_into_the_run_dir(tmp_path, builtin_data,
                                                         tiny_model) -> None:
    run = tmp_path / "run"
    digits = builtin_data / "digits"
    res = subprocess.run(
        [sys.executable, str(SUBMIT), "eval", "--nodes", "2", "--tasks-per-node", "2",
         "--partition", "debug", "--timeout-min", "5", "--out", str(run), "--",
         "knn", "--model", str(tiny_model), "--train", str(digits / "train"),
         "--val", str(digits / "val"), "--k", "5"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.splitlines()[-1])
    assert info["tasks"] == 1  # evaluation is one process whatever the request
    sbatch = (run / "submission" / "sbatch.sh").read_text()
    assert "#SBATCH --nodes=1" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    try:
        fields = slurm.wait_for_job(info["job_id"], timeout_s=120)
    finally:
        subprocess.run(["scancel", info["job_id"]], timeout=30)
    assert fields["JobState"] == "COMPLETED", [
        p.read_text()[-2000:] for p in (run / "submitit").glob("*_log.err")]
    result = json.loads((run / "eval" / "knn.json").read_text())
    assert (result["n_train"], result["n_val"]) == (1438, 359)
    assert 0.0 <= result["top1"]["5"] <= 1.0 and result["model"] == str(tiny_model)
