"""Submit a dinosys job to Slurm with submitit, or run it on this machine with --local.

    python launch/submit.py train --nodes 4 --gpus-per-node 8 --partition gpu \\
        --timeout-min 2880 -- vitl14 optim.epochs=100
    python launch/submit.py train --nodes 1 --gpus-per-node 0 --tasks-per-node 2 \\
        --partition debug --timeout-min 10 -- mnist_tiny_cpu
    python launch/submit.py train --local --tasks-per-node 2 -- mnist_tiny_cpu
    python launch/submit.py curate --parts 8 --gpus-per-node 1 -- my_curation.yaml
    python launch/submit.py pipeline --partition gpu -- my_factory   # a job per stage, afterok

Everything is checked before anything is queued (Slurm reachable, partition known, config valid);
a problem ends with one line on stderr and exit code 2. A training job gets one task per GPU (per
CPU slot with ``--gpus-per-node 0 --tasks-per-node K``); each task reads its rank from Slurm.
The run directory (``runs/<name>-<jobid>`` unless ``--out``) receives ``submission/`` (command
line, sbatch script(s), resolved config, job.json) and submitit's logs under ``submitit/``. On
USR2 (time limit, preemption) training checkpoints on every rank and the job requeues itself
(launch/task.py), at most ``--max-requeues`` times. See docs/launch.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinosys.atomic import write_atomic  # noqa: E402
from dinosys.errors import NotAvailableError, UserError  # noqa: E402
from dinosys.names import check_name, check_script_value  # noqa: E402
from launch.describe import describe, job_command, shown_run_dir, slurm_check_line  # noqa: E402
from launch.jobs import JOB_KINDS, PreparedJob, prepare_jobs  # noqa: E402
from launch.params import default_parts, sbatch_script, slurm_parameters, tasks_per_node  # noqa: E402
from launch.task import Task  # noqa: E402

log = logging.getLogger("launch.submit")

SIGNAL_DELAY_S = 90  # USR2 this long before the time limit: time to finish a step and save


def build_parser() -> argparse.ArgumentParser:
    """The launcher's options (the job's own arguments come after ``--``)."""
    p = argparse.ArgumentParser(
        prog="launch/submit.py",
        description="Submit a dinosys job to Slurm (submitit) or run it here with --local. "
        "The job's CONFIG and key=value overrides follow `--`.",
    )
    p.add_argument("kind", choices=(*JOB_KINDS, "pipeline"),
                   help="what to run (pipeline: every stage of a pipeline config as its own "
                   "job, sized by the config's STAGE.resources, see docs/launch.md)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (sbatch --nodes; default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node; one task per GPU (default: 0, CPU-only: see "
                   "--tasks-per-node)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node on CPU-only partitions (default: 1; must equal "
                   "--gpus-per-node when that is > 0)")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    p.add_argument("--timeout-min", type=int, default=60,
                   help="time limit in minutes (sbatch --time; default: 60)")
    p.add_argument("--account", help="sbatch --account (default: none, Slurm's)")
    p.add_argument("--qos", help="sbatch --qos (default: none, Slurm's)")
    p.add_argument("--constraint", help="sbatch --constraint, node features, e.g. h100 "
                   "(default: none)")
    p.add_argument("--exclude", help="sbatch --exclude, nodes to avoid (default: none)")
    p.add_argument("--comment", help="sbatch --comment (default: none)")
    p.add_argument("--mem-gb", type=float,
                   help="memory per node in GB (sbatch --mem; default: Slurm's)")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPUs per task, data-loading workers + 1 (default: Slurm's, 1)")
    p.add_argument("--max-requeues", type=int, default=3,
                   help="how often a preempted/timed-out job requeues itself, compared with "
                   "SLURM_RESTART_COUNT (default: 3)")
    p.add_argument("--signal-delay-s", type=int, default=SIGNAL_DELAY_S,
                   help=f"USR2 this many seconds before the time limit (--signal=USR2@S; "
                   f"default: {SIGNAL_DELAY_S})")
    p.add_argument("--parts", type=int, default=None,
                   help="curate: tasks of every stage's Slurm array (default: nodes x tasks "
                   "per node)")
    p.add_argument("--name", help="job name (default: dinosys-<kind>-<config name>)")
    p.add_argument("--out", help="run directory (default: runs/<name>-<job id>, name: --name "
                   "or the config's name; --local: runs/<name>-local-<time>)")
    p.add_argument("--local", action="store_true",
                   help="run here (no Slurm): the same tasks as local processes, in the "
                   "foreground (default: off, submit to Slurm)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate (config, flags, and Slurm and the partition when a cluster "
                   "answers; says so when it skipped them), print the command, config, task "
                   "layout, run directory and sbatch script(s); queue nothing (default: off)")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks for errors (default: off, one line)")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Launcher arguments before ``--``, the job's after it."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def run_dir_template(args: argparse.Namespace, job: PreparedJob) -> str:
    """``--out``, or ``runs/<name>-%j`` (``%A`` for an array), absolute: tasks may start
    elsewhere. Tasks replace the placeholder with their job id."""
    if args.out:
        return str(check_script_value(Path(args.out).resolve(), "--out"))
    tag = "%A" if job.array_size else "%j"
    name = check_name(args.name or job.name, "--name" if args.name else "config name")
    return str((Path("runs") / f"{name}-{tag}").resolve())


def write_submission_record(run_dir: Path, job: PreparedJob, argv: Sequence[str],
                            info: dict[str, Any], sbatch: dict[str, str]) -> Path:
    """``run_dir/submission/``: command.txt, config.yaml, sbatch*.sh, job.json (atomic)."""
    sub = run_dir / "submission"
    command = f"cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *argv])}\n"
    write_atomic(sub / "command.txt", command)
    if job.resolved_config is not None:
        write_atomic(sub / "config.yaml", job.resolved_config)
    for name, text in sbatch.items():
        write_atomic(sub / name, text)
    write_atomic(sub / "job.json", json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return sub


def make_task(job: PreparedJob, run_dir: str, max_requeues: int, restart_count: int = 0) -> Task:
    """The callable every task of the job runs."""
    return Task(job.work, run_dir, max_requeues=max_requeues,
                handles_preemption=job.handles_preemption, resumable=job.resumable,
                restart_count=restart_count)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _submit_one(args: argparse.Namespace, job: PreparedJob, run_dir: str,
                dependency: str | None) -> tuple[Any, dict[str, Any]]:
    import submitit

    params = slurm_parameters(args, job, dependency)
    folder = Path(run_dir) / "submitit"
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**params)
    task = make_task(job, run_dir, args.max_requeues)
    try:
        if job.array_size:
            with executor.batch():
                jobs = [executor.submit(task) for _ in range(job.array_size)]
            first = jobs[0]
        else:
            first = executor.submit(task)
    except submitit.core.utils.FailedJobError as exc:
        raise UserError(f"sbatch refused the job: {_last_line(str(exc))}") from exc
    return first, params


def submit_slurm(args: argparse.Namespace, jobs: list[PreparedJob], argv: Sequence[str],
                 job_args: Sequence[str] = ()) -> dict:
    """Check the cluster, submit the job(s) (each after the previous one succeeded, ``afterok``),
    write the submission record; returns a summary with the job ids and the run directory."""
    from launch import slurm

    template = run_dir_template(args, jobs[0])
    if args.dry_run:
        parts = jobs[0].array_size or 1
        for line in describe(args, jobs, job_args, template, parts):
            print(line)
        checks = slurm_check_line(args)
        print(checks)
        for job in jobs:
            dependency = "afterok:<previous job>" if job is not jobs[0] else None
            params = slurm_parameters(args, job, dependency)
            print(f"# ---- {job.kind} {job.stage or ''}".rstrip())
            print(sbatch_script(params, Path(template) / "submitit", job.array_size), end="")
        return {"dry_run": True, "run_dir": shown_run_dir(template),
                "slurm_checked": not checks.startswith("Slurm checks: SKIPPED")}
    for job in jobs:  # resource flags are checked before the cluster is asked anything
        slurm_parameters(args, job)
    partitions = slurm.check_slurm()
    slurm.check_partition(args.partition, partitions)
    submitted: list[dict[str, Any]] = []
    sbatch: dict[str, str] = {}
    run_dir, dependency = template, None
    for job in jobs:
        sjob, params = _submit_one(args, job, run_dir, dependency)
        job_id = str(sjob.job_id).split("_")[0]  # an array's id
        run_dir = run_dir.replace("%j", job_id).replace("%A", job_id)
        name = f"sbatch-{job.stage}.sh" if job.stage else "sbatch.sh"
        sbatch[name] = Path(sjob.paths.submission_file).read_text()
        submitted.append({"job_id": job_id, "stage": job.stage or job.kind, "parameters": params,
                          "array_size": job.array_size,
                          "tasks": params["nodes"] * params["ntasks_per_node"],
                          "submission_file": str(sjob.paths.submission_file)})
        dependency = f"afterok:{job_id}"
    info = {"executor": "slurm", "kind": jobs[0].kind, "run_dir": run_dir, "jobs": submitted,
            "job_id": submitted[0]["job_id"], "max_requeues": args.max_requeues,
            "submitted_at": _now(), "slurm_conf": os.environ.get("SLURM_CONF")}
    write_submission_record(Path(run_dir), jobs[0], argv, info, sbatch)
    for job, s in zip(jobs, submitted):
        what = " ".join(dict.fromkeys((jobs[0].kind, s["stage"])))
        print(f"submitted {what} job {s['job_id']}: "
              f"{s['array_size'] or 1} x {s['tasks']} task(s)", file=sys.stderr)
        print(f"  command: {job_command(job, job_args, run_dir, job.array_size)}",
              file=sys.stderr)
    print(f"run directory: {run_dir}", file=sys.stderr)
    return {"job_id": submitted[0]["job_id"], "job_ids": [s["job_id"] for s in submitted],
            "run_dir": run_dir, "tasks": submitted[0]["tasks"],
            "submission_file": submitted[0]["submission_file"]}


class LocalJobFailed(Exception):
    """A --local job's task failed (exit code 1; its log has the traceback)."""


def _run_local_job(args: argparse.Namespace, job: PreparedJob, run_dir: Path) -> dict:
    import submitit

    ntasks = job.array_size or (tasks_per_node(args) if job.distributed else 1)
    executor = submitit.LocalExecutor(folder=run_dir / "submitit")
    executor.update_parameters(tasks_per_node=ntasks, nodes=1, timeout_min=args.timeout_min,
                               gpus_per_node=args.gpus_per_node,
                               signal_delay_s=args.signal_delay_s)
    restarts = 0
    while True:
        ljob = executor.submit(make_task(job, str(run_dir), args.max_requeues, restarts))
        print(f"running {' '.join(filter(None, (job.kind, job.stage)))} locally: {ntasks} "
              f"task(s), logs in "
              f"{run_dir / 'submitit'}", file=sys.stderr)
        try:
            results = ljob.results()
        except Exception as exc:  # submitit re-raises the task's failure with its traceback
            raise LocalJobFailed(f"local {job.kind} job failed: {_last_line(str(exc))} "
                                 f"(logs: {ljob.paths.stderr})") from exc
        status = results[0].get("status")
        if status == "preempted" and job.handles_preemption and restarts < args.max_requeues:
            restarts += 1
            print(f"preempted: starting again from the newest checkpoint ({restarts}/"
                  f"{args.max_requeues})", file=sys.stderr)
            continue
        return {"status": status, "restarts": restarts, "result": results[0], "tasks": ntasks}


def run_local(args: argparse.Namespace, jobs: list[PreparedJob], argv: Sequence[str]) -> dict:
    """The same tasks as local processes (submitit's LocalExecutor), in the foreground, one job
    after the other. A preempted run (USR2 to the tasks) starts again, like a Slurm requeue, at
    most ``--max-requeues`` times."""
    if args.nodes != 1:
        raise UserError(f"--local runs on this machine only: --nodes must be 1, got {args.nodes}")
    tasks_per_node(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.out:
        run_dir = Path(args.out).resolve()
    else:
        name = check_name(args.name or jobs[0].name, "--name" if args.name else "config name")
        run_dir = (Path("runs") / f"{name}-local-{stamp}").resolve()
    info: dict[str, Any] = {"executor": "local", "kind": jobs[0].kind, "run_dir": run_dir,
                            "max_requeues": args.max_requeues, "submitted_at": _now()}
    write_submission_record(run_dir, jobs[0], argv, info, {})
    results = []
    for job in jobs:
        results.append({"stage": job.stage or job.kind, **_run_local_job(args, job, run_dir)})
    last = results[-1]
    return {"status": last["status"], "run_dir": str(run_dir), "restarts": last["restarts"],
            "result": last["result"], "stages": [r["stage"] for r in results]}


def run_pipeline(args: argparse.Namespace, own: Sequence[str], job_args: Sequence[str],
                 record: Sequence[str]) -> dict:
    """``submit.py pipeline``: every stage of the pipeline config as its own job (Slurm,
    ``--dry-run``) or one after the other here (``--local``); launch/pipeline_submit.py."""
    from launch.pipeline import check_stage_flags
    from launch.pipeline_submit import run_pipeline_local, submit_pipeline

    check_stage_flags(own)
    if args.local:
        return run_pipeline_local(args, job_args, record)
    return submit_pipeline(args, job_args, record)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, validate, submit (or run locally); prints one JSON line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, job_args = split_argv(argv)
    args = build_parser().parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    record = ["launch/submit.py", *argv]
    try:
        if args.local and args.dry_run:
            raise UserError("--dry-run prints the Slurm submission; it does not combine with "
                            "--local")
        if args.kind == "pipeline":
            summary = run_pipeline(args, own, job_args, record)
        else:
            parts = default_parts(args) if args.kind == "curate" else 1
            jobs = prepare_jobs(args.kind, job_args, parts=parts)
            summary = (run_local(args, jobs, record) if args.local
                       else submit_slurm(args, jobs, record, job_args))
    except (UserError, NotAvailableError) as exc:
        if args.debug:
            raise
        print(f"launch/submit.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except LocalJobFailed as exc:
        print(f"launch/submit.py: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    if args.local and summary.get("status") != "finished":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
