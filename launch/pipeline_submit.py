"""Submitting a pipeline plan (launch/pipeline.py): to Slurm as jobs with ``afterok``
dependencies, printed by ``--dry-run``, or run here stage after stage with ``--local``.

Every check comes before the first ``sbatch``: the config, each stage's resources, Slurm and
the partitions, ``sbatch --test-only`` of every job (a GPU stage on a partition without GPUs, more
nodes or time than a partition has), and that no job of an earlier submission to the same
pipeline directory is still queued or running.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinosys.atomic import write_atomic
from dinosys.errors import UserError
from dinosys.names import check_name, check_script_value
from launch.params import sbatch_script, slurm_parameters
from launch.pipeline import CONFIG_FILE, StageJobs, job_command, load, plan_pipeline


def pipeline_dir(args: argparse.Namespace, cfg: Any) -> Path:
    """``--out``, else the config's ``out``, else ``runs/<name>-<time>`` (absolute: the jobs
    start elsewhere). Give the same directory again to resume or rerun a pipeline."""
    if args.out or cfg.out:
        return Path(str(check_script_value(args.out or cfg.out, "--out"))).resolve()
    name = check_name(args.name or cfg.name, "--name" if args.name else "pipeline name")
    return (Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def _dependency(stage: StageJobs, last_job: dict[str, str]) -> str | None:
    ids = [last_job[dep] for dep in stage.inputs if dep in last_job]
    return "afterok:" + ":".join(ids) if ids else None


def _layout(stage: StageJobs) -> str:
    res = stage.resources
    gpus = res["gpus_per_node"]
    where = f"{gpus} GPU(s) per node" if gpus else "CPU only"
    if not stage.jobs[-1].distributed:
        tasks = "1 task" + (", 1 GPU" if gpus else ", CPU only")
    else:
        per_node = gpus or res["tasks_per_node"]
        tasks = f"{res['nodes']} node(s) x {per_node} task(s), {where}"
    arrays = [j for j in stage.jobs if j.array_size]
    if arrays:
        tasks = (f"{len(arrays)} array(s) of {arrays[0].array_size} x 1 task "
                 f"({', '.join(j.stage.split('-', 1)[1] for j in arrays)}), then {tasks}")
    limit = f", {res['timeout_min']} min" + (f", partition {stage.args.partition}"
                                              if stage.args.partition else "")
    return tasks + limit


def describe(stages: list[StageJobs], run_dir: Path, config: str) -> list[str]:
    """The plan in words: per stage its layout, what it waits for and its command, or that it
    is complete and skipped."""
    todo = [s for s in stages if not s.complete]
    lines = [f"pipeline directory: {run_dir}",
             f"config: {config}; resolved: {run_dir}/submission/{CONFIG_FILE} (written at "
             "submission; the jobs run exactly it, and the recipes it names as they are when "
             "each stage starts)",
             f"stages: {len(stages)}, to run: {len(todo)}, complete (skipped): "
             f"{len(stages) - len(todo)}"]
    queued = {s.name for s in todo}
    for stage in stages:
        if stage.complete:
            lines.append(f"stage {stage.name}: complete ({run_dir / stage.name}/COMPLETE.json), "
                         "skipped")
            continue
        after = [d for d in stage.inputs if d in queued]
        done = [d for d in stage.inputs if d not in queued]
        wait = ", ".join(after) or "-"
        if done:
            wait += f" (complete: {', '.join(done)})"
        lines.append(f"stage {stage.name}: {_layout(stage)}; after: {wait}")
        for job in stage.jobs:
            lines.append(f"  command: {job_command(job, str(run_dir))}")
    return lines


def check_cluster(stages: list[StageJobs], run_dir: Path) -> None:
    """Slurm reachable, every stage's partition known, every job accepted by
    ``sbatch --test-only``; UserError naming the stage otherwise."""
    from launch import slurm

    partitions = slurm.check_slurm()
    for stage in stages:
        if stage.complete:
            continue
        try:
            slurm.check_partition(stage.args.partition, partitions)
        except UserError as exc:
            raise UserError(f"stage {stage.name}: {exc}") from None
        for job in stage.jobs:
            params = slurm_parameters(stage.args, job)
            refused = slurm.test_only(sbatch_script(params, run_dir / "submitit", job.array_size))
            if refused:
                what = f" ({job.stage})" if job.stage != stage.name else ""
                raise UserError(f"stage {stage.name}{what}: Slurm would refuse its job "
                                f"({_resources_words(params)}): {refused}")


def _resources_words(params: dict[str, Any]) -> str:
    words = [f"{params['nodes']} node(s) x {params['ntasks_per_node']} task(s)"]
    if params.get("gpus_per_node"):
        words.append(f"{params['gpus_per_node']} GPU(s) per node")
    words.append(f"{params['time']} min")
    if params.get("partition"):
        words.append(f"partition {params['partition']}")
    return ", ".join(words)


def check_not_queued(run_dir: Path) -> None:
    """UserError when a job of an earlier submission to ``run_dir`` is still queued or running:
    two jobs of one stage would write the same directory."""
    from launch import slurm

    record = run_dir / "submission" / "job.json"
    if not record.is_file():
        return
    try:
        jobs = json.loads(record.read_text()).get("jobs", [])
    except ValueError:
        return
    for job in jobs:
        state = slurm.job_fields(job["job_id"]).get("JobState")
        if state in slurm.ACTIVE_STATES:
            raise UserError(f"{run_dir} has a job of an earlier submission in the queue: "
                            f"{job['job_id']} (stage {job['stage']}, {state}); wait for it or "
                            f"`scancel` it before submitting again")


def submit_pipeline(args: argparse.Namespace, job_args: Sequence[str],
                    argv: Sequence[str]) -> dict:
    """Plan, check, then submit every incomplete stage's jobs in dependency order; returns a
    summary with the job ids per stage and the pipeline directory."""
    from launch.submit import _now, _submit_one, write_submission_record

    cfg, _, resolved = load(job_args)
    run_dir = pipeline_dir(args, cfg)
    stages = plan_pipeline(args, cfg, run_dir)
    for stage in stages:  # resource flags are checked before the cluster is asked anything
        for job in stage.jobs:
            slurm_parameters(stage.args, job)
    todo = [s for s in stages if not s.complete]
    if args.dry_run:
        from launch.describe import slurm_check_line

        print(f"dry run: nothing is queued or written (pipeline {cfg.name}, "
              f"{sum(len(s.jobs) for s in todo)} job(s))")
        from launch.describe import config_file

        for line in describe(stages, run_dir, str(config_file("pipeline", job_args))):
            print(line)
        checks = slurm_check_line(args)
        if not checks.startswith("Slurm checks: SKIPPED"):
            check_cluster(stages, run_dir)
            checks = checks.rstrip(")") + "; every job accepted by sbatch --test-only)"
        print(checks)
        last = {s.name: f"<{s.name} job>" for s in todo}
        for stage in todo:
            dependency = _dependency(stage, last)
            for job in stage.jobs:
                print(f"# ---- stage {stage.name}" + (f" ({job.stage})" if job.stage !=
                                                       stage.name else ""))
                params = slurm_parameters(stage.args, job, dependency)
                print(sbatch_script(params, run_dir / "submitit", job.array_size), end="")
                dependency = f"afterok:<{job.stage} job>"
        return {"dry_run": True, "run_dir": str(run_dir), "to_run": [s.name for s in todo],
                "complete": [s.name for s in stages if s.complete],
                "slurm_checked": not checks.startswith("Slurm checks: SKIPPED")}
    if todo:
        check_cluster(stages, run_dir)
        check_not_queued(run_dir)
    submitted: list[dict[str, Any]] = []
    sbatch: dict[str, str] = {}
    last_job: dict[str, str] = {}
    for stage in todo:
        dependency = _dependency(stage, last_job)
        for job in stage.jobs:
            sjob, params = _submit_one(stage.args, job, str(run_dir), dependency)
            job_id = str(sjob.job_id).split("_")[0]
            sbatch[f"sbatch-{job.stage}.sh"] = Path(sjob.paths.submission_file).read_text()
            submitted.append({"job_id": job_id, "stage": stage.name, "job": job.stage,
                              "dependency": dependency, "array_size": job.array_size,
                              "tasks": params["nodes"] * params["ntasks_per_node"],
                              "parameters": params})
            print(f"submitted stage {stage.name}"
                  + (f" ({job.stage})" if job.stage != stage.name else "")
                  + f": job {job_id}, {job.array_size or 1} x "
                  f"{params['nodes'] * params['ntasks_per_node']} task(s)"
                  + (f", {dependency}" if dependency else ""), file=_stderr())
            dependency = f"afterok:{job_id}"
        last_job[stage.name] = submitted[-1]["job_id"]
    complete = [s.name for s in stages if s.complete]
    for name in complete:
        print(f"stage {name}: complete ({run_dir / name}/COMPLETE.json), not submitted",
              file=_stderr())
    if todo:
        write_atomic(run_dir / "submission" / CONFIG_FILE, resolved)
        info = {"executor": "slurm", "kind": "pipeline", "pipeline": cfg.name,
                "run_dir": str(run_dir), "jobs": submitted, "complete": complete,
                "max_requeues": args.max_requeues, "submitted_at": _now()}
        job = todo[0].jobs[0]
        write_submission_record(run_dir, job, argv, info, sbatch)
    print(f"pipeline directory: {run_dir}", file=_stderr())
    return {"run_dir": str(run_dir), "job_ids": [s["job_id"] for s in submitted],
            "stages": {s.name: last_job.get(s.name, "complete") for s in stages},
            "complete": complete}


def _stderr():  # noqa: ANN202
    import sys

    return sys.stderr


def run_pipeline_local(args: argparse.Namespace, job_args: Sequence[str],
                       argv: Sequence[str]) -> dict:
    """Every incomplete stage here, in dependency order, with the same jobs (submitit's
    LocalExecutor: the training stages on ``tasks_per_node`` local processes, the curation
    arrays as local tasks); a preempted stage starts again like a requeue."""
    from launch.submit import _now, _run_local_job, write_submission_record

    cfg, _, resolved = load(job_args)
    run_dir = pipeline_dir(args, cfg)
    stages = plan_pipeline(args, cfg, run_dir)
    for stage in stages:
        if stage.resources["nodes"] != 1:
            raise UserError(f"--local runs on this machine only: stage {stage.name} asks for "
                            f"{stage.resources['nodes']} nodes (set {stage.name}.resources."
                            "nodes=1)")
    write_atomic(run_dir / "submission" / CONFIG_FILE, resolved)
    info = {"executor": "local", "kind": "pipeline", "pipeline": cfg.name,
            "run_dir": str(run_dir), "max_requeues": args.max_requeues, "submitted_at": _now()}
    write_submission_record(run_dir, stages[0].jobs[-1], argv, info, {})
    results: dict[str, str] = {}
    restarts = 0
    for stage in stages:
        if stage.complete:
            print(f"stage {stage.name}: complete, skipped", file=_stderr())
            results[stage.name] = "skipped"
            continue
        for job in stage.jobs:
            res = _run_local_job(stage.args, job, run_dir)
            restarts += res["restarts"]
            if res["status"] != "finished":
                results[stage.name] = res["status"]
                return {"status": res["status"], "run_dir": str(run_dir), "stages": results,
                        "restarts": restarts}
        results[stage.name] = res["result"].get("stage_status", "ran")
    return {"status": "finished", "run_dir": str(run_dir), "stages": results,
            "restarts": restarts}
