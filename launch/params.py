"""Launcher options -> Slurm resources (submitit SlurmExecutor parameters, i.e. sbatch flags).

| launcher flag | submitit parameter | sbatch |
|---|---|---|
| --nodes N | nodes | --nodes=N |
| --gpus-per-node G | gpus_per_node, ntasks_per_node=G | --gpus-per-node=G --ntasks-per-node=G |
| --tasks-per-node K (G=0) | ntasks_per_node | --ntasks-per-node=K |
| --partition P | partition | --partition=P |
| --timeout-min T | time | --time=T |
| --account/--qos/--constraint/--exclude/--comment | same names | same flags |
| --mem-gb M | mem | --mem=MGB |
| --cpus-per-task C | cpus_per_task | --cpus-per-task=C |
| --signal-delay-s S | signal_delay_s | --signal=USR2@S |
| --name | job_name | --job-name |
| (always) | additional_parameters | --requeue |
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from dinosys.errors import UserError
from dinosys.names import check_name, check_script_value
from launch.jobs import PreparedJob


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


def default_parts(args: argparse.Namespace) -> int:
    """Parallel curation embedding jobs: ``--parts``, else one per task slot of the request."""
    if getattr(args, "parts", None) is not None:
        return args.parts
    return args.nodes * tasks_per_node(args)


def _mem(mem_gb: float) -> str:
    if mem_gb <= 0:
        raise UserError(f"--mem-gb must be > 0, got {mem_gb}")
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def slurm_parameters(args: argparse.Namespace, job: PreparedJob,
                     dependency: str | None = None) -> dict[str, Any]:
    """The SlurmExecutor parameters (sbatch options) of one job of this submission.

    A distributed job gets ``--nodes`` x one task per GPU (or ``--tasks-per-node`` CPU tasks);
    a single-task job (evaluation, a curation stage, each element of an array) gets one node,
    one task and at most one GPU.
    """
    if args.timeout_min < 1:
        raise UserError(f"--timeout-min must be >= 1, got {args.timeout_min}")
    ntasks = tasks_per_node(args)
    if job.distributed:
        nodes, gpus = args.nodes, args.gpus_per_node
    else:
        nodes, ntasks, gpus = 1, 1, min(args.gpus_per_node, 1)
    stage = f"-{job.stage}" if job.stage else ""
    if args.name is not None:
        check_name(args.name, "--name")
    params: dict[str, Any] = {
        "job_name": check_name((args.name or f"dinosys-{job.kind}-{job.name}") + stage,
                               "job name"),
        "time": args.timeout_min,
        "nodes": nodes,
        "ntasks_per_node": ntasks,
        "signal_delay_s": args.signal_delay_s,
        # Slurm may requeue it (node failure, preemption), and so may the job itself
        "additional_parameters": {"requeue": True},
    }
    optional = {
        "partition": args.partition, "account": args.account, "qos": args.qos,
        "constraint": args.constraint, "exclude": args.exclude, "comment": args.comment,
        "cpus_per_task": args.cpus_per_task, "gpus_per_node": gpus or None,
        "mem": None if args.mem_gb is None else _mem(args.mem_gb), "dependency": dependency,
    }
    params.update({k: check_script_value(v, f"--{k.replace('_', '-')}")
                   for k, v in optional.items() if v is not None})
    return params


def sbatch_script(params: dict[str, Any], folder: Path, array_size: int = 0) -> str:
    """The sbatch script submitit writes for these parameters (shown by --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    check_script_value(folder, "run directory")
    python = shlex.quote(sys.executable)
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size or None,
                               **params)
