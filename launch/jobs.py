"""Job kinds: how each one is validated on the submitting machine and what its tasks run.

``prepare_jobs(kind, job_args)`` does all the checking BEFORE anything is queued (config files,
keys, types, paths) and returns :class:`PreparedJob` s whose ``work`` is a picklable callable
that every task runs with its :class:`~launch.task.TaskContext`. The training config travels
resolved inside the job, so a requeue hours later runs exactly the config that was submitted
even if the YAML files changed meanwhile.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from dinosys.atomic import write_atomic
from dinosys.config import load_config, to_yaml
from dinosys.errors import UserError
from dinosys.eval.cli import EvalRequest
from launch.task import TaskContext

log = logging.getLogger(__name__)

JOB_KINDS = ("train", "clip", "distill", "curate", "eval")
# training kinds: one path (run_train_work, collective preemption + requeue); the schema is the
# config's task's (dinosys.train.tasks.TASKS), by default the task registered for the kind
TRAIN_KINDS = ("train", "clip", "distill")


@dataclass
class PreparedJob:
    """A validated job, ready to submit."""

    kind: str
    name: str  # default job name (the recipe's ``name``)
    work: Callable[[TaskContext], dict]
    resolved_config: str | None  # YAML text saved in the run directory
    distributed: bool  # one task per GPU (or CPU slot); False: a single task
    handles_preemption: bool  # the work checkpoints collectively on USR2 and says "preempted"
    resumable: bool = False  # restarting the work from scratch skips what is already done
    array_size: int = 0  # > 0: a Slurm array of this many single-task jobs (--local: tasks)
    stage: str = ""  # within a pipeline (curation): the stage this job runs


def split_config_args(job_args: Sequence[str], kind: str) -> tuple[str, list[str]]:
    """``CONFIG key=value ...`` -> (config, overrides); UserError when CONFIG is missing."""
    args = list(job_args)
    if not args or "=" in args[0] or args[0].startswith("-"):
        raise UserError(f"`{kind}` needs a CONFIG (path or name under configs/) after `--`, "
                        "e.g. `-- mnist_tiny_cpu optim.epochs=2`")
    bad = [a for a in args[1:] if "=" not in a or a.startswith("-")]
    if bad:
        raise UserError(f"after the CONFIG only key=value overrides are allowed, got '{bad[0]}'")
    return args[0], args[1:]


# --------------------------------------------------------------------------- work functions
# Module-level functions bound with functools.partial: submitit pickles them by reference.


def run_train_work(cfg: object, ctx: TaskContext) -> dict:
    """A task of a training job: ``dinosys.train.run.run_train`` on the resolved config."""
    from dinosys.train.run import run_train

    summary = run_train(cfg, ctx.run_dir)  # type: ignore[arg-type]
    return dict(summary)


def run_cli_work(argv: list[str], config_yaml: str | None, ctx: TaskContext) -> dict:
    """A task that runs a ``dinosys`` subcommand in-process (a resolved config is written to
    ``RUN/submission/config.yaml`` and passed as CONFIG). Raises when it fails."""
    from dinosys.cli import main

    argv = [a.replace("{run_dir}", str(ctx.run_dir)) for a in argv]
    if config_yaml is not None:
        path = ctx.run_dir / "submission" / "config.yaml"
        if not path.exists():
            write_atomic(path, config_yaml)
        argv = [argv[0], str(path), *argv[1:]]
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"`dinosys {' '.join(argv)}` exited with code {code}")
    summary: dict = {"status": "finished", "command": ["dinosys", *argv]}
    if "--out" in argv and argv[argv.index("--out") + 1].endswith(".json"):
        summary["result"] = json.loads(Path(argv[argv.index("--out") + 1]).read_text())
    return summary


def run_eval_work(request: EvalRequest, ctx: TaskContext) -> dict:
    """A task of an evaluation job: the evaluator on this task's shard of every image set,
    through ``dinosys.eval.cli.run_request`` (the JSON result lands in
    ``RUN/eval/<evaluator>.json`` unless the request names a file)."""
    from dinosys.eval.cli import run_request

    if request.out is None:
        request = dataclasses.replace(request,
                                      out=ctx.run_dir / "eval" / f"{request.evaluator}.json")
    result = run_request(request)
    return {"status": "finished", "evaluator": result.get("evaluator"),
            "metrics": result.get("metrics"), "out": str(request.out)}


def run_curate_work(stage: str, config_yaml: str, parts: int, ctx: TaskContext) -> dict:
    """A task of a curation job: ``dinosys-curate STAGE CONFIG [--part i/n]`` in-process, on the
    resolved config. ``parts`` > 0: this task runs part i of ``parts`` of the stage (i = its
    array index on Slurm, its rank with --local)."""
    from curation.cli import main

    path = ctx.run_dir / "submission" / "config.yaml"
    if not path.exists():
        write_atomic(path, config_yaml)
    argv = [stage, str(path), "--no-progress"]
    if parts:
        index = ctx.array_index if ctx.array_index is not None else ctx.rank
        argv += ["--part", f"{index}/{parts}"]
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"`dinosys-curate {' '.join(argv)}` exited with code {code}")
    return {"status": "finished", "stage": stage, "part": argv[-1] if parts else None}


# --------------------------------------------------------------------------- preparation


def _prepare_train(kind: str, config: str, overrides: list[str]) -> PreparedJob:
    """A training job of any task: validated with the task's schema, run by
    ``dinosys.train.run.run_train`` on every rank, preemption-safe (collective checkpoint, then
    requeue)."""
    from dinosys.cli import load_command_config

    cfg = load_command_config(kind, config, overrides)
    return PreparedJob(kind=kind, name=cfg.name, work=functools.partial(run_train_work, cfg),
                       resolved_config=to_yaml(cfg), distributed=True, handles_preemption=True)


def _prepare_eval(job_args: list[str]) -> PreparedJob:
    """Any registered evaluator (or the suite), parsed and validated here with the `dinosys
    eval` parser; every task of the job runs it through the evaluator registry (features
    sharded over the tasks, one per GPU)."""
    if not job_args:
        raise UserError("`eval` needs the `dinosys eval` arguments after `--`, e.g. "
                        "`-- knn --model RUN --train DIR --val DIR`")
    from dinosys.eval.cli import parse_request

    request = parse_request(job_args)
    if not request.model.startswith("random:") and not Path(request.model).exists():
        raise UserError(f"eval --model {request.model}: no such file or directory")
    record = yaml.safe_dump({"evaluator": request.evaluator, "model": request.model,
                             "config": dataclasses.asdict(request.config),
                             "command": request.command()}, sort_keys=False)
    return PreparedJob(kind="eval", name=f"eval-{request.evaluator}",
                       work=functools.partial(run_eval_work, request), resolved_config=record,
                       distributed=True, handles_preemption=False)


CURATE_ARRAYS = ("ingest", "embed", "dedup", "verify", "cluster", "retrieve", "shard")


def _prepare_curate(config: str, overrides: list[str], parts: int) -> list[PreparedJob]:
    """Curation as chained jobs, each after the previous one succeeded (``afterok``): one array
    of ``parts`` tasks per split stage (``dinosys-curate STAGE CONFIG --part i/n``: ingest,
    embed, dedup's kNN slices, verification blocks when ``dedup.verify`` is on, cluster
    assignment, retrieval, shards), each merging the stage before it first (one task merges,
    the others wait), then one job that merges the shards and writes the report (``run``:
    every finished stage skips itself). Every stage is idempotent, so USR2 simply requeues."""
    from curation.config import CurationConfig

    cfg = load_config(CurationConfig, config, overrides, kind="curation")
    text = to_yaml(cfg)
    stages = [s for s in CURATE_ARRAYS if s != "verify" or cfg.dedup.verify.enabled]
    jobs = [PreparedJob(kind="curate", name=cfg.name, stage=stage,
                        work=functools.partial(run_curate_work, stage, text, parts),
                        resolved_config=text, distributed=False, handles_preemption=False,
                        resumable=True, array_size=parts) for stage in stages]
    jobs.append(PreparedJob(kind="curate", name=cfg.name, stage="run",
                            work=functools.partial(run_curate_work, "run", text, 0),
                            resolved_config=text, distributed=False, handles_preemption=False,
                            resumable=True))
    return jobs


def prepare_jobs(kind: str, job_args: Sequence[str], parts: int = 1) -> list[PreparedJob]:
    """Validate a job locally (no Slurm involved) and return the job(s) to submit in order,
    each after the previous one succeeded; UserError / NotAvailableError when invalid.
    ``parts``: how many tasks each array of a curation runs."""
    if kind in TRAIN_KINDS:
        return [_prepare_train(kind, *split_config_args(job_args, kind))]
    if kind == "eval":
        return [_prepare_eval(list(job_args))]
    if kind == "curate":
        if parts < 1:
            raise UserError(f"--parts must be >= 1, got {parts}")
        return _prepare_curate(*split_config_args(job_args, kind), parts)
    raise UserError(f"unknown job kind '{kind}'; one of {', '.join(JOB_KINDS)}")
