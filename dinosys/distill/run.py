"""`dinosys distill`: set up the teacher, the students on their ranks, the data and the loop;
export every student's EMA backbone at the end."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinosys.config import save_config
from dinosys.distill.config import DistillConfig
from dinosys.distill.task import DistillTask
from dinosys.distributed.env import DistEnv, init_distributed, seed_everything
from dinosys.distributed.fsdp import DistConfig
from dinosys.errors import UserError
from dinosys.train.ema import ema_pairs, ema_update
from dinosys.train.loop import LoopResult, Trainer
from dinosys.train.optim import build_param_groups
from dinosys.train.tasks.base import Exportable, TrainTask
from dinosys.train.tasks.ssl import SSLSchedules

log = logging.getLogger(__name__)


def distill_param_groups(task: DistillTask, cfg: DistillConfig) -> list[dict]:
    """AdamW groups per student: its own depth for layer-wise decay, its own lr multiplier."""
    groups: list[dict] = []
    for name, student in task.students.items():
        s_cfg = task.student_cfgs[name]
        optim = cfg.optim
        if s_cfg.layerwise_decay is not None:
            optim = dataclasses.replace(optim, layerwise_decay=s_cfg.layerwise_decay)
        ratio = (s_cfg.base_lr / cfg.optim.base_lr) if s_cfg.base_lr is not None else 1.0
        for group in build_param_groups(student.modules, optim):
            group["lr_mult"] *= ratio
            group["names"] = [f"{name}.{n}" for n in group["names"]]
            groups.append(group)
    return groups


class _Sched:
    """The scheduled values DistillTask.forward_loss reads."""

    def __init__(self, teacher_temp: float) -> None:
        self.teacher_temp = teacher_temp


class DistillLoopTask(TrainTask):
    """A :class:`DistillTask` seen through the task contract, so the shared loop runs it
    (schedules, last-layer freeze and student EMAs owned here, as SSLTask owns its own).
    Transitional: the distill task itself moves onto the contract and the TASKS registry."""

    name = "distill_runner"

    def __init__(self, task: DistillTask, cfg: DistillConfig, env: DistEnv,
                 total_steps: int) -> None:
        super().__init__(cfg, env)  # type: ignore[arg-type]
        self.inner = task
        self.schedules = SSLSchedules(cfg.optim, cfg.loss, total_steps)
        self._ema: list[tuple[list, list]] | None = None

    def trainable_modules(self) -> dict[str, nn.Module]:
        return self.inner.trainable_modules()

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return self.inner.checkpoint_modules()

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.inner.extra_state()

    def load_extra_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_extra_state(state)

    def build_loader(self) -> Any:
        raise RuntimeError("the distill runner builds its loader itself")

    def prepare_batch(self, batch: Any) -> Any:
        from dinosys.data.gpu_augment import apply_photometric

        return apply_photometric(batch, self.device)

    def param_groups(self) -> list[dict]:
        return distill_param_groups(self.inner, self.cfg)  # type: ignore[arg-type]

    def schedule_values(self, step: int) -> dict[str, float]:
        return {"momentum": self.schedules.momentum(step),
                "teacher_temp": self.schedules.teacher_temp(step)}

    def forward_loss(self, batch: Any, step: int) -> dict[str, Any]:
        return self.inner.forward_loss(batch, _Sched(self.schedules.teacher_temp(step)))

    def before_optimizer_step(self, step: int) -> None:
        if self.schedules.last_layer_frozen(step):
            for module in self.trainable_modules().values():
                for name, param in module.named_parameters():
                    if "last_layer" in name:
                        param.grad = None

    def after_optimizer_step(self, step: int, applied: torch.Tensor) -> None:
        if self._ema is None:
            self._ema = [ema_pairs(t, s) for t, s in self.inner.ema_modules()]
        for t_list, s_list in self._ema:
            ema_update(t_list, s_list, self.schedules.momentum(step), apply=applied)

    def step_flops(self, batch: Any) -> float:
        return self.inner.step_flops(batch)

    def exports(self) -> dict[str, Exportable]:
        return {name: Exportable(ema, lambda: None)
                for name, ema in self.inner.export_backbones().items()}


class DistillTrainer(Trainer):
    """The shared loop with per-student parameter groups and world-consistent student logs."""

    def __init__(self, task: DistillTask, loader: Any, cfg: DistillConfig, env: DistEnv,
                 run_dir: Path, total_steps: int, total_batch: int,
                 knn_sets: tuple[Any, Any] | None = None) -> None:
        from dinosys.train.periodic_eval import KnnEvaluator

        self.distill_task = task
        loop_task = DistillLoopTask(task, cfg, env, total_steps)
        evaluators = []
        if knn_sets is not None:
            evaluators.append(KnnEvaluator(cfg.eval.knn_every_n_steps, *knn_sets,
                                           cfg.eval.knn_k, cfg.eval.knn_temperature))
        super().__init__(loop_task, loader, cfg, env, run_dir, total_steps,  # type: ignore[arg-type]
                         total_batch, evaluators)

    def _log(self, step: int, logs: dict[str, float], window: dict[str, float],
             skipped: int) -> dict[str, Any]:
        from dinosys.train.device_step import read_scalars

        return super()._log(step, self.distill_task.world_logs(read_scalars(logs)), window,
                            skipped)


def shard_for_training(task: DistillTask, env: DistEnv, cfg: DistConfig) -> None:
    """FSDP2: the teacher backbone over the whole world; each student (and its EMA, sharded
    the same way) over its own ranks."""
    if not env.is_distributed:
        return
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from dinosys.distributed.fsdp import build_mesh, shard_modules

    world_mesh = build_mesh(env, cfg)
    teacher_bb = task.teacher.backbone
    for block in teacher_bb.blocks:
        fully_shard(block, mesh=world_mesh)
    fully_shard(teacher_bb, mesh=world_mesh)
    for name, student in task.students.items():
        group = task.layout.groups[name]
        mesh = world_mesh if group is None else DeviceMesh.from_group(group, env.device.type)
        shard_modules(student.modules, env, cfg, mesh)
        shard_modules({"backbone": student.ema}, env, cfg, mesh, trainable=False)


def _knn_sets(cfg: DistillConfig) -> tuple[Any, Any] | None:
    ev = cfg.eval
    if not (ev.knn_train and ev.knn_val):
        return None
    from dinosys.eval.images import load_image_folder

    size = cfg.crops.global_size
    return (load_image_folder(Path(ev.knn_train), size, cfg.crops.mean, cfg.crops.std),
            load_image_folder(Path(ev.knn_val), size, cfg.crops.mean, cfg.crops.std))


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors of a (possibly FSDP2-sharded) module on every rank of its mesh
    (collective over that mesh only, so one student's ranks can gather without the others)."""
    out = {}
    for key, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[key] = value.detach().cpu().clone()
    return out


def export_students(task: DistillTask, cfg: DistillConfig, run_dir: Path, env: DistEnv,
                    card: dict, knn_sets: tuple[Any, Any] | None) -> dict[str, Any]:
    """Gather each student's EMA backbone (collective over its ranks), evaluate it with kNN
    when eval folders are set, and export it to ``run_dir/export/<name>`` from its first rank."""
    from dinosys.export.exporter import export_model
    from dinosys.models import backbone_from_config

    results: dict[str, Any] = {}
    for name, ema in task.export_backbones().items():
        state = full_state_dict(ema)
        if env.rank != task.layout.ranges[name].start:
            continue
        backbone: nn.Module = backbone_from_config(task.students[name].model_cfg)
        backbone.load_state_dict(state)
        backbone.eval()
        s_card = dict(card, name=f"{cfg.name} student {name}")
        s_card["recipe"] = dict(card["recipe"], student=name,
                                arch=task.students[name].model_cfg.arch)
        if knn_sets is not None:
            from dinosys.eval.knn import knn_eval_module

            res = knn_eval_module(backbone, *knn_sets, cfg.eval.knn_k,
                                  cfg.eval.knn_temperature, device=env.device)
            s_card["evaluation"] = {f"knn_top1_k{k}": v for k, v in res["top1"].items()}
            s_card["evaluation"]["command"] = (f"dinosys eval knn --model {run_dir}/export/{name} "
                                               f"--train {cfg.eval.knn_train} --val "
                                               f"{cfg.eval.knn_val}")
            results[name] = {"knn_top1": res["top1"]}
        summary = export_model(backbone, run_dir / "export" / name, cfg.export_formats, s_card)
        results.setdefault(name, {})["export"] = summary["out"]
    env.barrier()
    return results


def run_distill(cfg: DistillConfig, run_dir: Path) -> dict:
    """Distill ``cfg`` into ``run_dir`` (single process, torchrun or Slurm); return a summary."""
    env = init_distributed()
    try:
        return _run(cfg, Path(run_dir), env)
    finally:
        env.shutdown()


def _run(cfg: DistillConfig, run_dir: Path, env: DistEnv) -> dict:
    from dinosys.data.multicrop import build_ssl_loader
    from dinosys.train.run import (
        _setup_logging,
        configure_cpu_threads,
        ensure_builtin_sources,
        total_steps_of,
    )

    t0 = time.perf_counter()
    _setup_logging(env)
    total_steps = total_steps_of(cfg)
    task = DistillTask(cfg.teacher, cfg.students, cfg.loss, cfg.crops, env.device,
                       env.rank, env.world_size, seed=cfg.seed)
    total_batch = cfg.data.batch_size_per_gpu * env.world_size * cfg.dist.grad_accum_steps
    for name in task.layout.ranges:
        task.layout.images_per_rank(name, cfg.data.batch_size_per_gpu * env.world_size)
    check_resumable(task, cfg, run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
    # the final kNN of each student reads eval.knn_* even without periodic kNN: build them too
    wants_knn = bool(cfg.eval.knn_train and cfg.eval.knn_val)
    ensure_builtin_sources(dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, knn_every_n_steps=int(wants_knn))), env)
    threads = configure_cpu_threads(cfg, env)
    log.info("%d intra-op threads per rank", threads)
    seed_everything(cfg.seed, env.rank)
    shard_for_training(task, env, cfg.dist)
    loader = build_ssl_loader(cfg, env.rank, env.world_size, task.patch_size)
    knn_sets = _knn_sets(cfg)
    periodic = knn_sets if cfg.eval.knn_every_n_steps else None
    trainer = DistillTrainer(task, loader, cfg, env, run_dir, total_steps, total_batch, periodic)
    log.info("distilling %s (%s, %s mode) into %s: %d steps, global batch %d, %d ranks",
             task.teacher_info["arch"], task.teacher_info["path"], task.mode,
             {n: task.student_cfgs[n].model.arch for n in task.layout.ranges}, total_steps,
             total_batch, env.world_size)
    result: LoopResult = trainer.run()
    summary: dict[str, Any] = {
        "status": result.status, "step": result.step, "total_steps": total_steps,
        "run_dir": str(run_dir), "world_size": env.world_size, "mode": task.mode,
        "teacher": task.teacher_info, "nonfinite_steps": result.nonfinite_steps,
        "loss": result.last.get("loss"), "images_per_s": result.last.get("images_per_s"),
        "students": {n: {k.split("/", 1)[1]: v for k, v in result.last.items()
                         if k.startswith(f"{n}/")} for n in task.layout.ranges},
        "checkpoint": str(trainer.state.manager.latest()),
    }
    if result.status == "finished":
        card = {"teacher": task.teacher_info,
                "data": [s.path for s in cfg.data.sources],
                "recipe": {"name": cfg.name, "mode": task.mode, "steps": result.step,
                           "global_batch": total_batch, "mask_student": cfg.loss.mask_student},
                "mean": list(cfg.crops.mean), "std": list(cfg.crops.std)}
        exported = export_students(task, cfg, run_dir, env, card, knn_sets)
        exported = _gather_results(exported, env)
        for name, res in exported.items():
            summary["students"].setdefault(name, {}).update(res)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    if torch.cuda.is_available():
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return summary


def _gather_results(results: dict[str, Any], env: DistEnv) -> dict[str, Any]:
    """Every rank's per-student export results, merged (rank 0 prints the summary)."""
    if not env.is_distributed:
        return results
    import torch.distributed as dist

    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, results)
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def check_resumable(task: DistillTask, cfg: DistillConfig, run_dir: Path) -> None:
    """Resuming students on rank subgroups is refused (one line) instead of hanging: restoring
    the optimizer state when ranks hold different students blocks in a collective (seen on 4
    gloo ranks). Students in turn (no ``ranks``) resume exactly, at any world size."""
    from dinosys.distributed.sharded_checkpoint import CheckpointManager

    if task.layout.in_turn or not cfg.checkpoint.resume:
        return
    if CheckpointManager(run_dir / "checkpoints").latest() is not None:
        raise UserError(f"{run_dir} has a checkpoint, but resuming students on rank subgroups "
                        "('ranks' set) is not supported yet: resume without 'ranks' (students "
                        "in turn on every rank) or start over with checkpoint.resume=false")


def check_config(cfg: DistillConfig) -> None:
    """Checks that need no teacher (the rest happen when the task is built)."""
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UserError(f"max_steps={cfg.max_steps}: distillation needs at least one step")
