"""Evaluation jobs on the real local Slurm cluster: any evaluator through the registry, one task
per slot, features sharded over the tasks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch import slurm

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"


def _submit_eval(run: Path, *evaluator_args: str) -> dict:
    res = subprocess.run(
        [sys.executable, str(SUBMIT), "eval", "--nodes", "1", "--tasks-per-node", "2",
         "--partition", "debug", "--timeout-min", "5", "--out", str(run), "--",
         *evaluator_args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.splitlines()[-1])
    try:
        fields = slurm.wait_for_job(info["job_id"], timeout_s=300)
    finally:
        subprocess.run(["scancel", info["job_id"]], timeout=30)
    assert fields["JobState"] == "COMPLETED", [
        p.read_text()[-2000:] for p in (run / "submitit").glob("*_log.err")]
    return info


@pytest.mark.slurm
def test_knn_eval_job_writes_its_result_into_the_run_dir(tmp_path, builtin_data,
                                                         tiny_model) -> None:
    run = tmp_path / "run"
    digits = builtin_data / "digits"
    info = _submit_eval(run, "knn", "--model", str(tiny_model), "--train",
                        str(digits / "train"), "--val", str(digits / "val"), "--k", "5")
    assert info["tasks"] == 2  # one task per slot, the features sharded over them
    sbatch = (run / "submission" / "sbatch.sh").read_text()
    assert "#SBATCH --nodes=1" in sbatch and "#SBATCH --ntasks-per-node=2" in sbatch
    result = json.loads((run / "eval" / "knn.json").read_text())
    assert (result["n_train"], result["n_val"]) == (1438, 359) and result["world_size"] == 2
    assert 0.0 <= result["top1"]["5"] <= 1.0 and result["model"] == str(tiny_model)
    from dinosys.eval.registry import run_evaluator

    local = run_evaluator("knn", str(tiny_model), train=str(digits / "train"),
                          val=str(digits / "val"), k=[5])
    assert result["top1"] == local["top1"]  # two sharded tasks = one process


@pytest.mark.slurm
def test_linear_eval_job_equals_one_process(tmp_path, builtin_data, tiny_model) -> None:
    run = tmp_path / "run"
    digits = builtin_data / "digits"
    options = ["--lrs", "0.01", "0.1", "--n-blocks", "1", "--epochs", "2"]
    _submit_eval(run, "linear", "--model", str(tiny_model), "--train", str(digits / "train"),
                 "--val", str(digits / "val"), *options)
    result = json.loads((run / "eval" / "linear.json").read_text())
    from dinosys.eval.registry import run_evaluator

    local = run_evaluator("linear", str(tiny_model), train=str(digits / "train"),
                          val=str(digits / "val"), lrs=[0.01, 0.1], n_blocks=[1], epochs=2)
    assert result["world_size"] == 2 and result["grid"] == local["grid"]


@pytest.mark.slurm
def test_suite_job_writes_results_beside_the_model(tmp_path, builtin_data, tiny_model) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    digits = builtin_data / "digits"
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"- name: digits\n  evaluator: knn\n  train: {digits / 'train'}\n"
                     f"  val: {digits / 'val'}\n  k: [5]\n"
                     f"- name: digits\n  evaluator: linear\n  train: {digits / 'train'}\n"
                     f"  val: {digits / 'val'}\n  lrs: [0.1]\n  n_blocks: [1]\n  epochs: 1\n")
    _submit_eval(tmp_path / "run", "suite", "--model", str(model), "--suite", str(suite))
    saved = json.loads((model / "eval" / "results.json").read_text())
    assert [(r["name"], r["evaluator"]) for r in saved["results"]] == [("digits", "knn"),
                                                                       ("digits", "linear")]
    assert "| digits | linear |" in (model / "README.md").read_text()
    job = json.loads((tmp_path / "run" / "eval" / "suite.json").read_text())
    assert job["metrics"] == saved["metrics"] and job["world_size"] == 2
