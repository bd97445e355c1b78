"""What a submission will do, in words: the dinosys command every task runs, the config file the
CONFIG argument resolved to, the task layout and the run directory (``--dry-run`` prints it; a
real submission prints the same command line)."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path

from dinosys.errors import UserError
from launch.jobs import PreparedJob
from launch.params import slurm_parameters

JOB_ID = "<job id>"  # how a run directory's %j / %A placeholder is shown before submission
CONFIG_KIND = {"train": "train", "clip": "clip", "distill": "distill", "curate": "curation",
               "pipeline": "pipeline"}


def shown_run_dir(template: str) -> str:
    """The run directory with Slurm's placeholder spelled out (``runs/x-<job id>``)."""
    return template.replace("%j", JOB_ID).replace("%A", JOB_ID)


def config_file(kind: str, job_args: Sequence[str]) -> Path | None:
    """The YAML file CONFIG names (a path, or a name under configs/), or None for kinds
    without a CONFIG (eval)."""
    from dinosys.config import find_config

    if kind not in CONFIG_KIND or not job_args:
        return None
    return find_config(job_args[0], kind=CONFIG_KIND[kind]).resolve()


def job_command(job: PreparedJob, job_args: Sequence[str], run_dir: str, parts: int) -> str:
    """The dinosys command line one task of ``job`` runs (the resolved config travels with the
    job and is written to ``RUN/submission/config.yaml``)."""
    config = f"{run_dir}/submission/config.yaml"
    if job.kind == "eval":
        words = ["dinosys", "eval", *job_args]
    elif job.kind == "curate":
        words = ["dinosys-curate", job.stage, config, "--no-progress"]
        if job.array_size:
            words += ["--part", f"<array index>/{parts}"]
    else:
        words = ["dinosys", job.kind, config, "--out", run_dir]
    return shlex.join(words)


def layout(args: argparse.Namespace, job: PreparedJob) -> str:
    """``2 node(s) x 8 task(s), 8 GPU(s) per node`` (or an array of single tasks)."""
    params = slurm_parameters(args, job)
    gpus = params.get("gpus_per_node", 0)
    where = f"{gpus} GPU(s) per node, one task per GPU" if gpus else "CPU only"
    if job.array_size:
        return f"array of {job.array_size} job(s) x 1 task, {where}"
    tasks = params["nodes"] * params["ntasks_per_node"]
    return (f"{params['nodes']} node(s) x {params['ntasks_per_node']} task(s) = {tasks} "
            f"task(s), {where}")


def slurm_check_line(args: argparse.Namespace) -> str:
    """Run the Slurm checks of a real submission (client commands, controller, partition).
    A cluster that answers is checked like a real submission (an unknown partition raises);
    without a reachable cluster the checks are skipped and the line says so."""
    from launch import slurm

    try:
        partitions = slurm.check_slurm()
    except UserError as exc:
        return f"Slurm checks: SKIPPED ({exc}); a real submission would stop here"
    slurm.check_partition(args.partition, partitions)
    which = f"partition '{args.partition}'" if args.partition else \
        f"default partition '{partitions[0]}'"
    return f"Slurm checks: passed (controller answers, {which} exists)"


def describe(args: argparse.Namespace, jobs: list[PreparedJob], job_args: Sequence[str],
             template: str, parts: int) -> list[str]:
    """The lines ``--dry-run`` prints before the sbatch script(s)."""
    run_dir = shown_run_dir(template)
    config = config_file(jobs[0].kind, job_args)
    chain = ", each after the previous one succeeded" if len(jobs) > 1 else ""
    lines = [f"dry run: nothing is queued or written ({jobs[0].kind}, {len(jobs)} job(s){chain})",
             f"run directory: {run_dir}" + (f"  ({JOB_ID}: the Slurm job id, known at "
                                            "submission)" if run_dir != template else ""),
             f"config: {config}" if config else "config: (none: the arguments after -- are the "
             "command's)"]
    if config:
        lines.append(f"resolved config: {run_dir}/submission/config.yaml (written at "
                     "submission; requeues run exactly it)")
    for job in jobs:
        name = " ".join(dict.fromkeys(filter(None, (job.kind, job.stage))))
        lines.append(f"job {name}: {layout(args, job)}")
        lines.append(f"  command: {job_command(job, job_args, run_dir, parts)}")
    return lines
