"""`dinosys train|clip|distill`: set up the process, the task, the data and the loop; export
every model the task names at the end (``RUN/export/<name>/``)."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from dinosys.config import save_config, to_dict
from dinosys.data.sources import check_source
from dinosys.distributed.env import DistEnv, init_distributed, seed_everything
from dinosys.distributed.sharded_checkpoint import CheckpointMismatchError
from dinosys.errors import UserError
from dinosys.train.loop import LoopResult, Trainer
from dinosys.train.periodic_eval import build_periodic_evaluators
from dinosys.train.tasks import build_task, get_task
from dinosys.train.tasks.base import RunConfig, TrainTask

log = logging.getLogger(__name__)

BUILTIN_SETS = ("mnist", "digits", "photos")
_BUILTIN_PATH = re.compile(rf"^(?P<root>.*?)/?(?:shards/)?(?P<set>{'|'.join(BUILTIN_SETS)})"
                           r"(?:/(?:train|val))?/?$")


def total_steps_of(cfg: RunConfig) -> int:
    """``max_steps`` if set, else ``optim.epochs * optim.iters_per_epoch``."""
    steps = cfg.max_steps
    if steps is None:
        steps = cfg.optim.epochs * cfg.optim.iters_per_epoch
    if steps < 1:
        raise UserError(f"training needs at least one step (max_steps={cfg.max_steps}, "
                        f"optim.epochs={cfg.optim.epochs})")
    return int(steps)


def ensure_builtin_sources(cfg: RunConfig, env: DistEnv) -> None:
    """Build the embedded data when a data source or a periodic-kNN folder points into a missing
    builtin folder under ``data.builtin_root`` (``<root>/mnist/train``, ``<root>/shards/mnist``
    ...), on rank 0; others wait. A missing path anywhere else is "not found", even when it
    ends like a builtin folder (a mistyped path must not fill a random folder with MNIST).
    Then every data source is checked: each shard of a pattern, the list file, the folder."""
    if not cfg.data.sources:
        raise UserError("no training data: set data.sources (e.g. data.sources=[{path: DIR}]) "
                        "or use the mnist_tiny_cpu recipe")
    paths = [("training data", src.path) for src in cfg.data.sources]
    if cfg.eval.knn_every_n_steps:
        paths += [("eval.knn_train", cfg.eval.knn_train), ("eval.knn_val", cfg.eval.knn_val)]
    builtin_root = Path(cfg.data.builtin_root).resolve()
    sets: set[str] = set()
    for what, text in paths:
        if not text:
            continue  # a missing kNN folder is reported by the kNN set-up
        path = Path(text)
        if path.exists() or any(ch in text for ch in "{}*"):
            continue
        match = _BUILTIN_PATH.match(path.as_posix())
        if match is None:
            raise UserError(f"{what} not found: {text}")
        if Path(match.group("root") or ".").resolve() != builtin_root:
            raise UserError(f"{what} not found: {text} (the embedded data is built only under "
                            f"data.builtin_root={cfg.data.builtin_root})")
        sets.add(match.group("set"))
    if sets and env.is_main:
        from dinosys.data.builtin import build_builtin

        log.info("building the embedded data %s under %s", sorted(sets), builtin_root)
        build_builtin(builtin_root, sets=sorted(sets))
    env.barrier()
    for src in cfg.data.sources:  # shard patterns, list files, folders: all there?
        check_source(src)


def configure_cpu_threads(cfg: RunConfig, env: DistEnv) -> int:
    """On CPU, one intra-op thread per core left after the data workers of every local rank.

    Oversubscribed OpenMP threads spin against each other and the loader workers: on a
    2-core machine 2 threads + 1 worker ran a tiny ViT step 20x slower than 1 thread.
    An explicit OMP_NUM_THREADS wins.
    """
    if env.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or (
        env.world_size if env.launcher != "single" else 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // max(local_ranks, 1) - cfg.data.num_workers)
    torch.set_num_threads(threads)
    return threads


def _setup_logging(env: DistEnv) -> None:
    level = logging.INFO if env.is_main else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("dinosys").setLevel(level)


def export_task(task: TrainTask, run_dir: Path, env: DistEnv, card: dict
                ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Gather each of the task's exports (collective over each module's ranks) and write
    ``run_dir/export/<name>/`` through :func:`dinosys.export.exporter.export_model` on its
    writer rank, evaluating it first when it says how. Returns (name -> path, name -> the
    evaluation's scalars), merged over every rank."""
    from dinosys.distributed.sharded_checkpoint import consolidated_state_dict
    from dinosys.export.exporter import export_model

    paths: dict[str, str] = {}
    evaluations: dict[str, dict[str, Any]] = {}
    for name, item in task.exports().items():
        state = consolidated_state_dict(item.module, rank=item.rank)
        out = run_dir / "export" / name
        if env.rank == item.rank:
            model = item.build()
            model.load_state_dict(state)
            model.eval()
            item_card = {**card, **item.card, "exported": name}
            if item.evaluate is not None:
                from dinosys.eval.features import unsharded

                with unsharded():  # only this rank evaluates: no collectives
                    evaluations[name] = item.evaluate(model)
                item_card["evaluation"] = evaluations[name]
            export_model(model, out, formats=list(item.formats), card=item_card)
        paths[name] = str(out)
    env.barrier()
    return _merged_over_ranks(paths, env), _merged_over_ranks(evaluations, env)


def _merged_over_ranks(part: dict[str, Any], env: DistEnv) -> dict[str, Any]:
    """Every rank's dict, merged (ranks may export different models)."""
    if not env.is_distributed:
        return part
    import torch.distributed as dist

    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, part)
    merged: dict[str, Any] = {}
    for entry in parts:
        merged.update(entry or {})
    return merged


def config_changes(cfg: RunConfig, run_dir: Path, limit: int = 10) -> str:
    """``the config differs from RUN/config.yaml in: model.depth (2 -> 3), ...`` (the keys
    whose values differ between ``cfg`` and the run's saved config)."""
    path = run_dir / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return f"{path} is missing or unreadable, so the changed keys are unknown"
    old, new = _flatten(saved if isinstance(saved, dict) else {}), _flatten(to_dict(cfg))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k,
                                                                                     "<unset>")]
    if not changed:
        return f"the config equals {path}"
    shown = ", ".join(f"{k} ({old.get(k, '<unset>')} -> {new.get(k, '<unset>')})"
                      for k in changed[:limit])
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return f"the config differs from {path} in: {shown}{more}"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def run_train(cfg: RunConfig, run_dir: Path) -> dict:
    """Train ``cfg`` (its ``task``) into ``run_dir`` (single process, torchrun or Slurm); return
    a summary: ``{"status": "finished" | "preempted", "step": N, "run_dir": ..., ...}``."""
    env = init_distributed()
    try:
        return _run(cfg, Path(run_dir), env)
    finally:
        env.shutdown()


def build_task_same_on_every_rank(cfg: RunConfig, env: DistEnv) -> TrainTask:
    """The task with rank 0's initial weights on every rank (the run seeds ``seed + rank``).

    FSDP2 does not broadcast weights: each rank keeps its shard of its own init, and with
    ``dist.fsdp: false`` (a replicate mesh) the replicas would start, and stay, different.
    Other ranks build under rank 0's seed, then go back to their own random stream; rank 0
    (and a single process) builds exactly as before.
    """
    if env.rank == 0:
        return build_task(cfg, env)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # what seed_everything(cfg.seed, 0) gave rank 0
        return build_task(cfg, env)


def _run(cfg: RunConfig, run_dir: Path, env: DistEnv) -> dict:
    t0 = time.perf_counter()
    _setup_logging(env)
    total_steps = total_steps_of(cfg)
    get_task(cfg.task).check_inputs(cfg)  # e.g. a teacher that cannot serve the students
    # every data source is checked (and embedded data built) before a model is built or
    # anything is written: a mistyped path must not leave runs/<name>/ behind
    ensure_builtin_sources(cfg, env)
    resolved = cfg  # written to config.yaml once the checkpoint (if any) accepted it
    threads = configure_cpu_threads(cfg, env)
    log.info("%d intra-op threads per rank", threads)
    seed_everything(cfg.seed, env.rank)
    cfg = get_task(cfg.task).device_layout(cfg, env)  # e.g. one GPU: no FSDP2 if it fits
    task = build_task_same_on_every_rank(cfg, env)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    task.shard()
    loader = task.build_loader()
    total_batch = cfg.data.batch_size_per_gpu * env.world_size * cfg.dist.grad_accum_steps
    evaluators = build_periodic_evaluators(cfg, task)
    def write_config(_start: int) -> None:
        if env.is_main:
            save_config(resolved, run_dir)

    trainer = Trainer(task, loader, cfg, env, run_dir, total_steps, total_batch, evaluators,
                      on_start=write_config)
    log.info("training %s (task %s): %d steps, global batch %d, peak lr %.3g, %d ranks on %s",
             cfg.name, cfg.task, total_steps, total_batch, trainer.schedule.peak_lr,
             env.world_size, env.device)
    try:
        result: LoopResult = trainer.run()
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{exc}; {config_changes(resolved, run_dir)}") from exc
    bad_samples = trainer.state.bad_samples()
    summary: dict[str, Any] = {
        "status": result.status, "step": result.step, "total_steps": total_steps,
        "task": cfg.task, "run_dir": str(run_dir), "world_size": env.world_size,
        "nonfinite_steps": result.nonfinite_steps,
        "loss": result.last.get("loss"), "images_per_s": result.last.get("images_per_s"),
        "checkpoint": str(trainer.state.manager.latest()),
        "bad_samples": bad_samples,
    }
    knn = result.evals.get("knn")
    if knn is not None and "top1" not in knn:  # per-module kNN (distillation students): in
        knn = None                             # the metrics log and the task's run summary
    if knn is not None:
        summary["knn_top1"] = knn["top1"]
    if result.status == "finished":
        card = {"recipe": cfg.name, "task": cfg.task, "steps": result.step,
                "global_batch": total_batch, "data": [s.path for s in cfg.data.sources]}
        if knn is not None:
            card["knn_top1_during_training"] = knn["top1"]
        exports, evaluations = export_task(task, run_dir, env, card)
        summary["exports"] = exports
        summary["export"] = next(iter(exports.values()), None)
        if evaluations:
            summary["evaluations"] = evaluations
    summary.update(task.run_summary(summary, result.last))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    if torch.cuda.is_available():
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return summary
