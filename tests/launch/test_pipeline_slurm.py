"""`launch/submit.py pipeline` on the real local Slurm cluster with the tiny CPU factory: every
stage runs as its own job in dependency order (curation arrays, then the merge, then the
models), a preempted training stage checkpoints, requeues and resumes, and a rerun skips what is
complete; `--local` runs the same chain without Slurm."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from launch_helpers import wait_for
from pipeline_tiny import write_tiny_pipeline

from launch import slurm

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"
STAGES = ["curate", "pretrain", "distill", "text_align", "evaluate", "export"]


def _submit(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), "pipeline", *argv], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines())
            if "loss" in r and "step" in r]


def _time(fields: dict[str, str], key: str) -> datetime:
    return datetime.fromisoformat(fields[key])


@pytest.mark.slurm
@pytest.mark.slow
def test_pipeline_runs_every_stage_in_order_resumes_a_preempted_stage_and_skips_complete_ones(
        tmp_path: Path, builtin_data: Path) -> None:
    from dinosys.factory.runner import load_pipeline
    from launch.pipeline import run_stage_work
    from launch.task import TaskContext

    config = write_tiny_pipeline(tmp_path / "cfg", builtin_data, pretrain_steps=40)
    run = tmp_path / "run"
    # pretraining on 2 Slurm tasks (gloo): the preemption is collective
    res = _submit("--partition", "debug", "--max-requeues", "2", "--out", str(run), "--",
                  str(config), "pretrain.resources.tasks_per_node=2")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.splitlines()[-1])
    jobs = json.loads((run / "submission" / "job.json").read_text())["jobs"]
    ids = [j["job_id"] for j in jobs]
    stage_job = info["stages"]
    try:
        assert sorted(stage_job) == sorted(STAGES) and info["complete"] == []
        assert [j["job"] for j in jobs] == [  # submitted in dependency order
            "curate-ingest", "curate-embed", "curate-dedup", "curate-cluster",
            "curate-retrieve", "curate-shard", "curate", "pretrain", "distill", "text_align",
            "evaluate", "export"]
        for job in jobs:  # the dependencies Slurm holds: arrays chained, then each stage's inputs
            if job["dependency"]:
                held = slurm.job_fields(job["job_id"]).get("Dependency", "")
                first = job["dependency"].split(":")[1]
                assert held.startswith(f"afterok:{first}") or held == "(null)", (job, held)
        assert jobs[-1]["dependency"] == "afterok:" + ":".join(
            stage_job[s] for s in STAGES[:-1])  # export reads every other stage
        wait_for(lambda: len(_steps(run / "pretrain")) >= 3, 600, "3 pretraining steps")
        subprocess.run(["scancel", "--signal=USR2", stage_job["pretrain"]], check=True,
                       timeout=30)
        pretrain = slurm.wait_for_job(stage_job["pretrain"], timeout_s=400,
                                      start_requeued_now=True)
        last = slurm.wait_for_job(stage_job["export"], timeout_s=600)
    finally:
        subprocess.run(["scancel", *ids], timeout=30)
    logs = {p.name: p.read_text()[-2000:] for p in (run / "submitit").glob("*_log.err")}
    assert last["JobState"] == "COMPLETED", (last, logs)
    assert pretrain["JobState"] == "COMPLETED" and pretrain["Restarts"] == "1"
    # preempted at a step boundary, resumed from its checkpoint: every step exactly once
    assert _steps(run / "pretrain") == list(range(1, 41))
    err = (run / "submitit" / f"{stage_job['pretrain']}_0_log.err").read_text()
    assert "requeued Slurm job" in err and "2 ranks on cpu" in err
    assert "preempted at step " in err and "checkpoint saved (" in err
    assert jobs[7]["tasks"] == 2
    fields = {s: slurm.job_fields(stage_job[s]) for s in STAGES}
    for job in jobs[:6]:  # every curation array task ran its part
        for index in (0, 1):
            assert slurm.job_fields(f"{job['job_id']}_{index}")["JobState"] == "COMPLETED"
    curation = run / "curate"
    for step in ("ingest", "knn", "cluster", "retrieve"):
        assert (curation / step / "parts" / "2" / "part-1.json").is_file(), step
    for job in jobs[6:]:  # each stage started after every job it waits for had ended
        waited = job["dependency"].split(":")[1:] if job["dependency"] else []
        start = _time(fields[job["stage"]], "StartTime")
        for dep in waited:
            dep_fields = slurm.job_fields(dep) or slurm.job_fields(f"{dep}_1")
            assert start >= _time(dep_fields, "EndTime"), (job["stage"], dep)
    for stage in STAGES:
        assert json.loads((run / stage / "COMPLETE.json").read_text())["stage"] == stage
    assert (run / "export" / "small" / "model.safetensors").is_file()
    assert (run / "export" / "text" / "config.json").is_file()

    # a rerun submits nothing: every stage is complete
    again = _submit("--partition", "debug", "--out", str(run), "--", str(config),
                    "pretrain.resources.tasks_per_node=2")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["job_ids"] == [] and summary["complete"] == STAGES
    assert "stage pretrain: complete" in again.stderr
    # a job whose stage is complete skips it (the check inside the job)
    cfg = load_pipeline(str(run / "submission" / "pipeline.yaml"))
    ctx = TaskContext(rank=0, world_size=1, local_rank=0, job_id=None, restart_count=0,
                      run_dir=run, executor="local")
    skipped = run_stage_work(cfg, "export", ctx)
    assert skipped["status"] == "finished" and skipped["stage_status"] == "skipped"
    # only the stage whose record is gone is submitted again, with nothing to wait for
    (run / "export" / "COMPLETE.json").unlink()
    again = _submit("--partition", "debug", "--out", str(run), "--", str(config))
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    [export_id] = summary["job_ids"]
    assert summary["complete"] == STAGES[:-1]
    try:
        assert slurm.wait_for_job(export_id, timeout_s=300)["JobState"] == "COMPLETED"
    finally:
        subprocess.run(["scancel", export_id], timeout=30)
    assert (run / "export" / "COMPLETE.json").is_file()


@pytest.mark.slow
def test_local_runs_the_whole_chain_without_slurm_and_skips_it_the_second_time(
        tmp_path: Path, builtin_data: Path) -> None:
    config = write_tiny_pipeline(tmp_path / "cfg", builtin_data, parts=1)
    run = tmp_path / "run"
    res = _submit("--local", "--out", str(run), "--", str(config))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["status"] == "finished"
    assert summary["stages"] == {s: "ran" for s in STAGES}
    finished = [json.loads((run / s / "COMPLETE.json").read_text())["finished"] for s in STAGES]
    assert finished == sorted(finished)  # one after the other, in dependency order
    again = _submit("--local", "--out", str(run), "--", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.splitlines()[-1])["stages"] == {s: "skipped" for s in STAGES}
