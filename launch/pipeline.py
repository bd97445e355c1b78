"""`launch/submit.py pipeline`: the factory's stages (``dinosys.factory``) as jobs with
dependencies, planned and checked before anything is queued.

Each stage of the pipeline config becomes one job running ``dinosys pipeline CONFIG --out DIR
--stage NAME`` (in-process, on the resolved config) with the resources of ``NAME.resources``;
the curation with ``resources.parts`` > 1 becomes one Slurm array per split curation step
(``dinosys-curate STEP --part i/n``, each after the previous one: the path of ``submit.py
curate --parts N``), then the stage job, which merges the parts and records the stage. A job
waits for the last job of every stage it reads (``--dependency=afterok:<ids>``). A stage whose
completion record is there (same digest) is not submitted, and a job whose stage completed
meanwhile skips it. Training stages checkpoint on USR2 and requeue (the training loop's
protocol); the other stages requeue at once and redo or resume their work.
"""

from __future__ import annotations

import argparse
import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinosys.errors import UserError
from launch.jobs import CURATE_ARRAYS, PreparedJob, split_config_args
from launch.task import TaskContext

# the launcher flags a pipeline takes from each stage's `resources` instead
STAGE_RESOURCE_FLAGS = ("--nodes", "--gpus-per-node", "--tasks-per-node", "--timeout-min",
                        "--parts")
CONFIG_FILE = "pipeline.yaml"  # the resolved pipeline config in DIR/submission/


@dataclass
class StageJobs:
    """One stage of the plan: its jobs in order (curation arrays, then the stage job), the
    launcher options with the stage's resources, the stages it waits for."""

    name: str
    inputs: list[str]
    args: argparse.Namespace
    jobs: list[PreparedJob] = field(default_factory=list)
    complete: bool = False
    resources: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- work functions
# Module-level, bound with functools.partial: submitit pickles them by reference.


def stage_status(summary: dict) -> str:
    """The launcher's status of a ``run_stage`` summary: "preempted" for a training stage
    stopped by USR2 (it checkpointed; the job requeues), "finished" when the stage ran, was
    already complete, or this task did its part; RuntimeError otherwise (dependents must not
    start)."""
    status = summary.get("status")
    if status in ("ran", "skipped", "part"):
        return "finished"
    record = summary.get("record") or {}
    if status == "incomplete" and record.get("status") == "preempted":
        return "preempted"
    raise RuntimeError(f"stage {summary.get('stage')} did not finish: status {status} "
                       f"({record.get('status', 'no further detail')})")


def run_stage_work(cfg: object, stage: str, ctx: TaskContext) -> dict:
    """A task of a stage job: ``dinosys pipeline CONFIG --out RUN --stage STAGE`` in-process
    (every task of a training stage's job, one task otherwise)."""
    from dinosys.factory.runner import run_pipeline

    summary = run_pipeline(cfg, ctx.run_dir, stage)  # type: ignore[arg-type]
    result = {**summary, "stage_status": summary.get("status"), "status": stage_status(summary)}
    if result["status"] == "preempted":  # where it stopped, for the job log's one line
        record = summary.get("record") or {}
        result.update(step=record.get("step"), checkpoint=record.get("checkpoint"))
    return result


def run_curate_step_work(cfg: object, step: str, parts: int, ctx: TaskContext) -> dict:
    """A task of a curation array: ``dinosys-curate STEP <the stage's curation> --part i/n``
    in-process, i = the Slurm array index (the rank with --local). No record: the stage job
    after the arrays merges the parts and records the stage."""
    from curation.cli import main
    from dinosys.factory.runner import input_records
    from dinosys.factory.stages import Context, ensure_builtin
    from dinosys.factory.stages_data import curate_argv

    index = ctx.array_index if ctx.array_index is not None else ctx.rank
    fctx = Context(cfg, ctx.run_dir, input_records(cfg, ctx.run_dir, "curate"),  # type: ignore
                   (index, parts))
    ensure_builtin(fctx, fctx.cfg.curate.overrides)
    argv = curate_argv(fctx, step)
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"`dinosys-curate {' '.join(argv)}` exited with code {code}")
    return {"status": "finished", "stage": "curate", "step": step, "part": f"{index}/{parts}"}


# --------------------------------------------------------------------------- planning


def check_stage_flags(launcher_argv: Sequence[str]) -> None:
    """A pipeline sizes each stage from its ``resources``: the per-job size flags are refused
    (one line) instead of silently ignored."""
    given = [a.split("=")[0] for a in launcher_argv if a.split("=")[0] in STAGE_RESOURCE_FLAGS]
    if given:
        raise UserError(f"{given[0]}: a pipeline sizes every stage from its config "
                        f"(STAGE.resources.nodes, gpus_per_node, tasks_per_node, timeout_min, "
                        f"parts); set it there, e.g. `-- CONFIG pretrain.resources.nodes=4`")


def stage_args(args: argparse.Namespace, resources: dict[str, Any]) -> argparse.Namespace:
    """The launcher options of one stage's jobs: its ``resources``; the launcher's flags
    (partition, account, qos, memory, CPUs per task...) where the stage does not say."""
    out = copy.copy(args)
    out.nodes = resources["nodes"]
    out.gpus_per_node = resources["gpus_per_node"]
    out.tasks_per_node = (resources["gpus_per_node"] if resources["gpus_per_node"] > 0
                          else resources["tasks_per_node"])
    out.timeout_min = resources["timeout_min"]
    out.parts = resources.get("parts", 1)
    for key in ("partition", "cpus_per_task", "mem_gb"):
        if resources.get(key) is not None:
            setattr(out, key, resources[key])
    return out


def check_resources(name: str, collective: bool, res: dict[str, Any]) -> None:
    """One-line errors for resources a stage cannot use: GPU jobs run one task per GPU; a stage
    that runs in one process asks for one node and one task; only curation has parts."""
    gpus, tasks = res["gpus_per_node"], res["tasks_per_node"]
    if gpus > 0 and tasks not in (1, gpus):
        raise UserError(f"stage {name}: resources.tasks_per_node {tasks} with gpus_per_node "
                        f"{gpus}: GPU jobs run one task per GPU (leave tasks_per_node at 1)")
    if not collective and (res["nodes"] > 1 or (gpus == 0 and tasks > 1) or gpus > 1):
        raise UserError(f"stage {name} runs in one process: its resources ask for "
                        f"{res['nodes']} node(s), {max(gpus, tasks)} task(s) per node; give it "
                        f"nodes=1, tasks_per_node=1 and at most 1 GPU")
    if res.get("parts", 1) > 1 and name != "curate":
        raise UserError(f"stage {name}: resources.parts: only the curate stage has parts")


def topological(plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The plan's stages, each after all its inputs; UserError for an input that names no
    stage of the plan or for a cycle (a launcher never queues a job that cannot start)."""
    by_name = {row["stage"]: row for row in plan}
    for row in plan:
        for dep in row["inputs"]:
            if dep not in by_name:
                raise UserError(f"stage {row['stage']} reads unknown stage '{dep}'; the stages "
                                f"are {', '.join(by_name)}")
    order: list[dict[str, Any]] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            raise UserError(f"the stages form a cycle (each reads the next): "
                            f"{' -> '.join(cycle)}")
        state[name] = "visiting"
        for dep in by_name[name]["inputs"]:
            visit(dep, [*path, name])
        state[name] = "done"
        order.append(by_name[name])

    for row in plan:
        visit(row["stage"], [])
    return order


def load(job_args: Sequence[str]) -> tuple[object, str, str]:
    """(config, its name, resolved YAML) of ``CONFIG key=value ...``, validated like
    ``dinosys pipeline``."""
    from dinosys.config import to_yaml
    from dinosys.factory.runner import load_pipeline

    config, overrides = split_config_args(job_args, "pipeline")
    cfg = load_pipeline(config, overrides)
    return cfg, cfg.name, to_yaml(cfg)


def plan_pipeline(args: argparse.Namespace, cfg: object, out: Path) -> list[StageJobs]:
    """Every enabled stage in dependency order with its jobs and launcher options; which are
    complete in ``out``. Everything is checked here, before anything is queued."""
    from dinosys.factory.checks import check_stages
    from dinosys.factory.runner import stage_complete
    from dinosys.factory.stages import is_enabled, plan

    rows = topological(plan(cfg))  # type: ignore[arg-type]
    if not rows:
        raise UserError("the pipeline has no enabled stage (every STAGE.enabled is false)")
    loaded = check_stages(cfg, out)  # type: ignore[arg-type]
    if is_enabled(cfg, "curate"):  # type: ignore[arg-type]
        try:
            loaded["curate"] = curation_config(cfg, out)
        except UserError as exc:
            raise UserError(f"stage curate: {exc}") from None
    stages = []
    for row in rows:
        name, res = row["stage"], row["resources"]
        check_resources(name, row["collective"], res)
        sargs = stage_args(args, res)
        jobs = []
        parts = res.get("parts", 1)
        if name == "curate" and parts > 1:
            verify = loaded["curate"].dedup.verify.enabled  # type: ignore[attr-defined]
            jobs = curate_step_jobs(cfg, parts, verify)
        jobs.append(PreparedJob(
            kind="pipeline", name=cfg.name, stage=name,  # type: ignore[attr-defined]
            work=functools.partial(run_stage_work, cfg, name), resolved_config=None,
            distributed=row["collective"], handles_preemption=row["collective"],
            resumable=not row["collective"]))
        stages.append(StageJobs(name=name, inputs=list(row["inputs"]), args=sargs, jobs=jobs,
                                complete=stage_complete(cfg, out, name),  # type: ignore
                                resources=res))
    return stages


def curation_config(cfg: object, out: Path) -> object:
    """The curate stage's ``CurationConfig``: exactly the ``dinosys-curate`` arguments the stage
    passes (without the pool's sources, wired in at run time)."""
    from curation.cli import build_parser
    from curation.config import CurationConfig
    from dinosys.config import load_config
    from dinosys.factory.stages import Context
    from dinosys.factory.stages_data import curate_argv

    args, extra = build_parser().parse_known_args(curate_argv(Context(cfg, Path(out))))
    return load_config(CurationConfig, args.config, [*args.overrides, *extra,
                                                     f"out={args.out}"], kind="curation")


def curate_step_jobs(cfg: object, parts: int, verify: bool) -> list[PreparedJob]:
    """One array of ``parts`` tasks per split step of the stage's curation (verification only
    when its curation config turns it on)."""
    return [PreparedJob(kind="pipeline", name=cfg.name,  # type: ignore[attr-defined]
                        stage=f"curate-{step}",
                        work=functools.partial(run_curate_step_work, cfg, step, parts),
                        resolved_config=None, distributed=False, handles_preemption=False,
                        resumable=True, array_size=parts)
            for step in CURATE_ARRAYS if step != "verify" or verify]


def job_command(job: PreparedJob, run_dir: str) -> str:
    """The command line one task of a pipeline job runs."""
    import shlex

    config = f"{run_dir}/submission/{CONFIG_FILE}"
    if job.stage.startswith("curate-"):
        return (f"dinosys-curate {job.stage.split('-', 1)[1]} <stage curate's curation> "
                f"--part '<array index>/{job.array_size}'")
    return shlex.join(["dinosys", "pipeline", config, "--out", run_dir, "--stage", job.stage])
