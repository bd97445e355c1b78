"""Submit a dinosys job to Slurm with submitit, or run it on this machine with --local.

    python launch/submit.py train --nodes 4 --gpus-per-node 8 --partition gpu \\
        --timeout-min 2880 -- vitl14 optim.epochs=100
    python launch/submit.py train --nodes 1 --gpus-per-node 0 --tasks-per-node 2 \\
        --partition debug --timeout-min 10 -- mnist_tiny_cpu
    python launch/submit.py train --local --gpus-per-node 0 --tasks-per-node 2 -- mnist_tiny_cpu

Everything is checked before anything is queued (Slurm reachable, partition known, config valid);
a problem ends with one line on stderr and exit code 2. The job gets one task per GPU (per CPU
slot with ``--gpus-per-node 0 --tasks-per-node K``); each task reads its rank from Slurm. The run
directory (``runs/<name>-<jobid>`` unless ``--out``) receives ``submission/`` (command line,
sbatch script, resolved config, job.json) and submitit's logs under ``submitit/``. On USR2
(time limit, preemption) training checkpoints on every rank and the job requeues itself (see
launch/task.py), at most ``--max-requeues`` times. See docs/launch.md.
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

from dinosys.config import write_atomic  # noqa: E402
from dinosys.errors import NotAvailableError, UserError  # noqa: E402
from launch.jobs import JOB_KINDS, PreparedJob, prepare_job  # noqa: E402
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
    p.add_argument("kind", choices=JOB_KINDS, help="what to run")
    p.add_argument("--nodes", type=int, default=1, help="nodes (sbatch --nodes)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node; one task per GPU (0: CPU-only, see --tasks-per-node)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node on CPU-only partitions (default 1; must equal "
                   "--gpus-per-node when that is > 0)")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    p.add_argument("--timeout-min", type=int, default=60, help="time limit in minutes (--time)")
    p.add_argument("--account", help="sbatch --account")
    p.add_argument("--qos", help="sbatch --qos")
    p.add_argument("--constraint", help="sbatch --constraint (node features, e.g. h100)")
    p.add_argument("--exclude", help="sbatch --exclude (nodes to avoid)")
    p.add_argument("--comment", help="sbatch --comment")
    p.add_argument("--mem-gb", type=float, help="memory per node in GB (sbatch --mem)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per task (data-loading workers + 1)")
    p.add_argument("--max-requeues", type=int, default=3,
                   help="how often a preempted/timed-out job requeues itself (SLURM_RESTART_COUNT)")
    p.add_argument("--signal-delay-s", type=int, default=SIGNAL_DELAY_S,
                   help="USR2 this many seconds before the time limit (--signal=USR2@S)")
    p.add_argument("--name", help="job name (default: the config's name)")
    p.add_argument("--out", help="run directory (default: runs/<name>-<jobid>)")
    p.add_argument("--local", action="store_true",
                   help="run here (no Slurm): the same tasks as local processes, in the foreground")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the sbatch script; queue nothing")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Launcher arguments before ``--``, the job's after it."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def tasks_per_node(args: argparse.Namespace) -> int:
    """One task per GPU; ``--tasks-per-node`` on CPU-only partitions."""
    if args.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    if args.gpus_per_node > 0:
        if args.tasks_per_node not in (None, args.gpus_per_node):
            raise UserError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node "
                            f"{args.gpus_per_node}: GPU jobs run one task per GPU")
        return args.gpus_per_node
    tasks = 1 if args.tasks_per_node is None else args.tasks_per_node
    if tasks < 1:
        raise UserError(f"--tasks-per-node must be >= 1, got {tasks}")
    return tasks


def slurm_parameters(args: argparse.Namespace, job: PreparedJob) -> dict[str, Any]:
    """The SlurmExecutor parameters (sbatch options) of this submission."""
    if args.timeout_min < 1:
        raise UserError(f"--timeout-min must be >= 1, got {args.timeout_min}")
    if job.distributed:
        nodes, ntasks = args.nodes, tasks_per_node(args)
    else:  # a single-process job (evaluation): one task, the GPUs of one node at most
        nodes, ntasks = 1, 1
        tasks_per_node(args)
    params: dict[str, Any] = {
        "job_name": args.name or f"dinosys-{job.kind}-{job.name}",
        "time": args.timeout_min,
        "nodes": nodes,
        "ntasks_per_node": ntasks,
        "signal_delay_s": args.signal_delay_s,
        # Slurm may requeue it (node failure, preemption) and so may the job itself
        "additional_parameters": {"requeue": True},
    }
    optional = {
        "partition": args.partition, "account": args.account, "qos": args.qos,
        "constraint": args.constraint, "exclude": args.exclude, "comment": args.comment,
        "cpus_per_task": args.cpus_per_task,
        "gpus_per_node": args.gpus_per_node or None,
        "mem": None if args.mem_gb is None else _mem(args.mem_gb),
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def _mem(mem_gb: float) -> str:
    if mem_gb <= 0:
        raise UserError(f"--mem-gb must be > 0, got {mem_gb}")
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def sbatch_script(params: dict[str, Any], folder: Path) -> str:
    """The sbatch script submitit will write for these parameters (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = shlex.quote(sys.executable)
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **params)


def default_run_dir(args: argparse.Namespace, job: PreparedJob, job_id: str) -> Path:
    """``--out`` or ``runs/<name>-<job id>`` (absolute: tasks may start elsewhere)."""
    if args.out:
        return Path(args.out).resolve()
    name = args.name or job.name
    return (Path("runs") / f"{name}-{job_id}").resolve()


def write_submission_record(run_dir: Path, job: PreparedJob, argv: Sequence[str],
                            info: dict[str, Any], sbatch: str | None) -> Path:
    """``run_dir/submission/``: command.txt, config.yaml, sbatch.sh, job.json (atomic writes)."""
    sub = run_dir / "submission"
    command = f"cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *argv])}\n"
    write_atomic(sub / "command.txt", command)
    if job.resolved_config is not None:
        write_atomic(sub / "config.yaml", job.resolved_config)
    if sbatch is not None:
        write_atomic(sub / "sbatch.sh", sbatch)
    write_atomic(sub / "job.json", json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return sub


def make_task(job: PreparedJob, run_dir: str, max_requeues: int, restart_count: int = 0) -> Task:
    """The callable every task of the job runs."""
    return Task(job.work, run_dir, max_requeues=max_requeues,
                handles_preemption=job.handles_preemption, resumable=job.resumable,
                restart_count=restart_count)


def submit_slurm(args: argparse.Namespace, job: PreparedJob, argv: Sequence[str]) -> dict:
    """Check the cluster, submit with submitit, write the submission record."""
    import submitit

    from launch import slurm

    params = slurm_parameters(args, job)
    run_template = str(default_run_dir(args, job, "%j"))
    if args.dry_run:
        print(sbatch_script(params, Path(run_template) / "submitit"), end="")
        return {"dry_run": True, "parameters": params, "run_dir": run_template}
    partitions = slurm.check_slurm()
    slurm.check_partition(args.partition, partitions)
    executor = submitit.SlurmExecutor(folder=Path(run_template) / "submitit")
    executor.update_parameters(**params)
    try:
        sjob = executor.submit(make_task(job, run_template, args.max_requeues))
    except submitit.core.utils.FailedJobError as exc:
        raise UserError(f"sbatch refused the job: {_last_line(str(exc))}") from exc
    run_dir = Path(run_template.replace("%j", str(sjob.job_id)))
    sbatch = Path(sjob.paths.submission_file).read_text()
    info = {"executor": "slurm", "job_id": sjob.job_id, "kind": job.kind, "run_dir": run_dir,
            "parameters": params, "tasks": params["nodes"] * params["ntasks_per_node"],
            "max_requeues": args.max_requeues, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stdout": str(sjob.paths.stdout).replace("%t", "0"),
            "slurm_conf": os.environ.get("SLURM_CONF")}
    write_submission_record(run_dir, job, argv, info, sbatch)
    print(f"submitted {job.kind} job {sjob.job_id}: {info['tasks']} task(s), run dir {run_dir}",
          file=sys.stderr)
    return {"job_id": sjob.job_id, "run_dir": str(run_dir), "tasks": info["tasks"],
            "submission_file": str(sjob.paths.submission_file)}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def run_local(args: argparse.Namespace, job: PreparedJob, argv: Sequence[str]) -> dict:
    """The same tasks as local processes (submitit's LocalExecutor), in the foreground.

    A preempted run (USR2 to the task processes) is started again, like a Slurm requeue, at most
    ``--max-requeues`` times."""
    import submitit

    if args.nodes != 1:
        raise UserError(f"--local runs on this machine only: --nodes must be 1, got {args.nodes}")
    ntasks = tasks_per_node(args) if job.distributed else 1
    run_dir = (Path(args.out).resolve() if args.out else
               (Path("runs") / f"{args.name or job.name}-local-{time.strftime('%Y%m%d-%H%M%S')}")
               .resolve())
    info = {"executor": "local", "kind": job.kind, "run_dir": run_dir, "tasks": ntasks,
            "max_requeues": args.max_requeues, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_submission_record(run_dir, job, argv, info, None)
    executor = submitit.LocalExecutor(folder=run_dir / "submitit")
    executor.update_parameters(tasks_per_node=ntasks, nodes=1, timeout_min=args.timeout_min,
                               gpus_per_node=args.gpus_per_node,
                               signal_delay_s=args.signal_delay_s)
    restarts = 0
    while True:
        ljob = executor.submit(make_task(job, str(run_dir), args.max_requeues, restarts))
        print(f"running {job.kind} locally: {ntasks} task(s), logs {run_dir / 'submitit'}",
              file=sys.stderr)
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
        return {"status": status, "run_dir": str(run_dir), "restarts": restarts,
                "result": results[0]}


class LocalJobFailed(Exception):
    """A --local job's task failed (exit code 1; its log has the traceback)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, validate, submit (or run locally); prints one JSON line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, job_args = split_argv(argv)
    parser = build_parser()
    args = parser.parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        job = prepare_job(args.kind, job_args)
        if args.local:
            summary = run_local(args, job, ["launch/submit.py", *argv])
        else:
            summary = submit_slurm(args, job, ["launch/submit.py", *argv])
    except (UserError, NotAvailableError) as exc:
        if args.debug:
            raise
        print(f"launch/submit.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except LocalJobFailed as exc:
        print(f"launch/submit.py: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    if args.local and summary.get("status") not in ("finished", None):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
