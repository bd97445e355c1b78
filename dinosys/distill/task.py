"""The ``distill`` task: one frozen teacher forward per global batch, several students.

``dinosys distill CONFIG`` (and ``launch/submit.py distill``) runs it through the shared loop
and run path (:mod:`dinosys.train.run`): checkpoints, exact resume, preemption, exports.
Per step, every rank runs the teacher on its slice of the global batch, the teacher outputs
and crops are routed to the students' ranks (:mod:`dinosys.distill.ranks`), and each student
this rank trains computes its loss on its chunk (:mod:`dinosys.distill.student`); the
backpropagated loss is their sum (students share no parameters, so each gets its own
gradient). Logged values are per student, prefixed ``<name>/``, and weighted so that their
world mean is each student's subgroup mean (:meth:`DistillTask.rank_logs`). Each student's
EMA backbone is exported (``RUN/export/<name>/``) from its first rank, with a model card
naming the teacher, and evaluated with kNN first when ``eval.knn_train/knn_val`` are set.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dinosys.distill.checks import check_compatible, resolve_mode
from dinosys.distill.config import DistillConfig
from dinosys.distill.ranks import RankLayout, build_layout, to_crop_major, to_image_major
from dinosys.distill.student import N_GLOBAL, Student
from dinosys.distill.teacher import Teacher, load_teacher, place_teacher
from dinosys.distributed.env import DistEnv
from dinosys.errors import UserError
from dinosys.models import backbone_forward_flops, backbone_from_config, resolve_config
from dinosys.train.ema import ema_pairs, ema_update
from dinosys.train.optim import build_param_groups
from dinosys.train.tasks import register_task
from dinosys.train.tasks.base import Exportable, TrainTask
from dinosys.train.tasks.ssl import SSLSchedules

log = logging.getLogger(__name__)

TEACHER_KEYS = {"heads": ("cls_bottleneck", "patch_bottleneck"), "features": ("cls", "patches")}


def _teacher_key(cfg: DistillConfig) -> tuple:
    return (cfg.teacher.path, cfg.teacher.arch, cfg.teacher.num_heads)


@register_task
class DistillTask(TrainTask):
    """Frozen teacher + the students of this rank (see the module docstring)."""

    name = "distill"
    config_class = DistillConfig
    command = "distill"
    config_kind = "distill"
    # the teacher check_inputs loaded, kept for __init__ (a large teacher is read once)
    _checked: tuple[tuple, Teacher] | None = None

    @classmethod
    def check_inputs(cls, cfg: DistillConfig) -> None:
        """Load the teacher and check it against the objective, the students and the data
        (one-line UserError before any work); the loaded teacher is kept for ``__init__``."""
        cls._checked = None
        teacher = load_teacher(cfg.teacher.path, cfg.teacher.arch, cfg.teacher.num_heads)
        check_compatible(teacher, cfg.students, cfg.crops, resolve_mode(cfg.loss.mode, teacher))
        cls._checked = (_teacher_key(cfg), teacher)

    def __init__(self, cfg: DistillConfig, env: DistEnv | None = None,
                 teacher: Teacher | None = None) -> None:
        """Load the teacher (or take ``teacher``), check it against the students and the data
        (one-line UserError), create the students' rank groups and build this rank's students
        on the CPU (the same initial weights for a student in any layout)."""
        super().__init__(cfg, env or DistEnv())
        env = self.env
        names = [s.name for s in cfg.students]
        if len(set(names)) != len(names):
            raise UserError(f"student names must be unique, got {names}")
        t_cfg = cfg.teacher
        checked, DistillTask._checked = DistillTask._checked, None
        if teacher is None and checked is not None and checked[0] == _teacher_key(cfg):
            teacher = checked[1]
        teacher = teacher or load_teacher(t_cfg.path, t_cfg.arch, t_cfg.num_heads)
        self.mode = resolve_mode(cfg.loss.mode, teacher)
        check_compatible(teacher, cfg.students, cfg.crops, self.mode)
        self.teacher_info = teacher.describe()
        self.layout: RankLayout = build_layout({s.name: s.ranks for s in cfg.students},
                                               env.world_size, env.rank)
        per_rank = cfg.data.batch_size_per_gpu * env.world_size
        for name in self.layout.ranges:  # the global batch splits over each student's ranks
            self.layout.images_per_rank(name, per_rank)
        self.student_cfgs = {s.name: s for s in cfg.students}
        self.students: dict[str, Student] = {}
        for name in self.layout.local_students:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + zlib.crc32(name.encode()))
                student = Student(self.student_cfgs[name], teacher, cfg.loss, self.mode,
                                  self.layout.groups[name])
            self.students[name] = student.to(self.device)
        self.teacher = place_teacher(teacher, self.device, t_cfg.dtype)
        self.loss_cfg, self.crops = cfg.loss, cfg.crops
        self.patch_size = teacher.patch_size
        self.schedules = SSLSchedules(cfg.optim, cfg.loss, cfg.total_steps())
        self._ema: list[tuple[list, list]] | None = None
        self._flops: dict[tuple, float] = {}
        self._knn: Any = None  # the final kNN (a RegistryEvaluator), built at first use
        if self._wants_knn() and not cfg.eval.knn_every_n_steps:
            # the final kNN of each student reads eval.knn_*: build embedded data there too
            from dinosys.train.run import ensure_builtin_sources

            ensure_builtin_sources(dataclasses.replace(
                cfg, eval=dataclasses.replace(cfg.eval, knn_every_n_steps=1)), env)

    # ------------------------------------------------------------------ modules

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Every local student's trainable modules, keyed ``<student>-<part>`` (clipped one by
        one, as DINOv2 clips backbone and heads)."""
        return {f"{name}-{part}": module for name, s in self.students.items()
                for part, module in s.modules.items()}

    def shard(self) -> None:
        """FSDP2: the teacher backbone over the whole world; each student (and its EMA,
        sharded the same way so their local shards pair up) over its own ranks."""
        from dinosys.distributed.fsdp import build_mesh, shard_modules

        world_mesh = build_mesh(self.env, self.cfg.dist) if self.env.is_distributed else None
        if world_mesh is not None:
            from torch.distributed.device_mesh import DeviceMesh
            from torch.distributed.fsdp import fully_shard

            teacher_bb = self.teacher.backbone
            for block in teacher_bb.blocks:
                fully_shard(block, mesh=world_mesh)
            fully_shard(teacher_bb, mesh=world_mesh)
        for name, student in self.students.items():
            group = self.layout.groups[name]
            mesh = world_mesh
            if group is not None:
                mesh = DeviceMesh.from_group(group, self.env.device.type)
            shard_modules(student.modules, self.env, self.cfg.dist, mesh)
            shard_modules({"backbone": student.ema}, self.env, self.cfg.dist, mesh,
                          trainable=False)

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Students (with heads / projection) and their EMAs; never the teacher."""
        out: dict[str, nn.Module] = {}
        for name, s in self.students.items():
            out[f"student_{name}"] = s.modules
            out[f"ema_{name}"] = s.ema
        return out

    def extra_state(self) -> dict[str, Tensor]:
        """Each local student's teacher-target centres, keyed ``<student>.<buffer>``."""
        return {f"{name}.{k}": v for name, s in self.students.items()
                for k, v in s.extra_state().items()}

    def load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`extra_state`."""
        for name, s in self.students.items():
            prefix = f"{name}."
            s.load_extra_state({k[len(prefix):]: v for k, v in state.items()
                                if k.startswith(prefix)})

    # ------------------------------------------------------------------ data

    def build_loader(self) -> Iterable[Any]:
        """Multi-crop (+ masks) over the run's sources, rank-split as for pretraining: each
        rank loads its slice of the global batch, which the teacher sees once."""
        from dinosys.data.multicrop import build_ssl_loader

        return build_ssl_loader(self.cfg, self.env.rank, self.env.world_size, self.patch_size)

    def prepare_batch(self, batch: Any) -> Any:
        """Device-side photometric ops; the crops reach the device when they are routed."""
        from dinosys.data.gpu_augment import apply_photometric

        return apply_photometric(batch, self.device)

    # ------------------------------------------------------------------ optimisation

    def param_groups(self) -> list[dict]:
        """AdamW groups per student: its own depth for layer-wise decay, its own lr
        multiplier (``students[].base_lr`` relative to ``optim.base_lr``)."""
        groups: list[dict] = []
        for name, student in self.students.items():
            s_cfg = self.student_cfgs[name]
            optim = self.cfg.optim
            if s_cfg.layerwise_decay is not None:
                optim = dataclasses.replace(optim, layerwise_decay=s_cfg.layerwise_decay)
            ratio = s_cfg.base_lr / optim.base_lr if s_cfg.base_lr is not None else 1.0
            for group in build_param_groups(student.modules, optim):
                group["lr_mult"] *= ratio
                group["names"] = [f"{name}.{n}" for n in group["names"]]
                groups.append(group)
        return groups

    def schedule_values(self, step: int) -> dict[str, float]:
        return {"momentum": self.schedules.momentum(step),
                "teacher_temp": self.schedules.teacher_temp(step)}

    def before_optimizer_step(self, step: int) -> None:
        """The heads' last layer stays frozen early on (``optim.freeze_last_layer_epochs``)."""
        if self.schedules.last_layer_frozen(step):
            for module in self.trainable_modules().values():
                for name, param in module.named_parameters():
                    if "last_layer" in name:
                        param.grad = None

    def after_optimizer_step(self, step: int, applied: Tensor) -> None:
        """Each student's EMA follows it (none when the step was skipped)."""
        if self._ema is None:
            self._ema = [ema_pairs(s.ema, s.backbone) for s in self.students.values()]
        for t_list, s_list in self._ema:
            ema_update(t_list, s_list, self.schedules.momentum(step), apply=applied)

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def teacher_outputs(self, global_crops: Tensor) -> dict[str, Tensor]:
        """The teacher on this rank's global crops: the targets this mode needs, crop-major."""
        out = self.teacher.encode(global_crops)
        keys = TEACHER_KEYS[self.mode]
        if self.mode == "heads" and self.loss_cfg.feature_weight > 0:
            keys = keys + TEACHER_KEYS["features"]
        return {k: out[k] for k in keys}

    def route(self, batch: Mapping[str, Any], t_out: Mapping[str, Tensor]
              ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Crops, masks and teacher outputs of this rank's student chunk (crop-major)."""
        dev = self.device
        parts = {"global_crops": (batch["global_crops"].to(dev, non_blocking=True), N_GLOBAL),
                 "masks": (batch["masks"].to(dev, non_blocking=True), N_GLOBAL)}
        local = batch["local_crops"]
        if self.crops.n_local and local.numel():
            parts["local_crops"] = (local.to(dev, non_blocking=True), self.crops.n_local)
        for key, value in t_out.items():
            parts[key] = (value, N_GLOBAL)
        routed = {k: to_crop_major(self.layout.exchange(to_image_major(v, n)))
                  for k, (v, n) in parts.items()}
        routed.setdefault("local_crops", torch.empty(0, device=dev))
        crops = {k: routed.pop(k) for k in ("global_crops", "local_crops", "masks")}
        return crops, routed

    def forward_loss(self, batch: Mapping[str, Any], step: int) -> dict[str, Any]:
        """Teacher once, then each local student on the same routed targets."""
        t_out = self.teacher_outputs(batch["global_crops"].to(self.device, non_blocking=True))
        crops, targets = self.route(batch, t_out)
        temp = self.schedules.teacher_temp(step)
        total: Tensor | None = None
        logs: dict[str, Any] = {}
        for name, student in self.students.items():
            out = student.forward_loss(crops, targets, temp)
            total = out["loss"] if total is None else total + out["loss"]
            logs.update({f"{name}/{k}": v for k, v in out.items()})
        assert total is not None  # every rank trains at least one student (layout check)
        return {"loss": total, **logs}

    def rank_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Every rank reports every student's keys (the world average needs one layout): a
        local student's values are scaled by world / n_ranks(student), the others are 0, so
        the world mean is each student's subgroup mean."""
        world = self.layout.world_size
        out: dict[str, float] = {}
        for key, value in logs.items():
            student = next((n for n in self.layout.ranges
                            if key.startswith((f"{n}/", f"grad_norm/{n}-"))), None)
            if student is None:
                out[key] = value
            else:
                out[key] = value * world / len(self.layout.ranges[student])
        for name in self.layout.ranges:
            if name not in self.students:
                for key in self._log_keys(name):
                    out[key] = 0.0
        return out

    def _log_keys(self, name: str) -> list[str]:
        features = self.mode == "features" or self.loss_cfg.feature_weight > 0
        terms = ["loss", "koleo_loss"]
        parts = ["backbone"]
        if self.mode == "heads":
            terms += ["dino_loss", "ibot_loss"]
            parts.append("dino_head")
            if self.teacher.head_cfg is not None and self.teacher.head_cfg.ibot_separate_head:
                parts.append("ibot_head")
        if features:
            terms += ["cls_loss", "patch_loss"]
            if resolve_config(self.student_cfgs[name].model).embed_dim != self.teacher.embed_dim:
                parts.append("proj")
        keys = [f"{name}/{t}" for t in terms]
        return keys + [f"grad_norm/{name}-{p}" for p in parts]

    # ------------------------------------------------------------------ accounting

    def teacher_step_flops(self, batch: Mapping[str, Any]) -> float:
        """Teacher forward FLOPs on this rank's global crops (backbone only)."""
        g = batch["global_crops"]
        key = ("t", g.shape[-1])
        if key not in self._flops:
            self._flops[key] = backbone_forward_flops(self.teacher.backbone.cfg, g.shape[-1])
        return self._flops[key] * g.shape[0]

    def step_flops(self, batch: Mapping[str, Any]) -> float:
        """Teacher forward on this rank's slice + 3x forward of each local student on its
        chunk (backbones; heads are a few percent and left out)."""
        g = batch["global_crops"]
        loc = batch["local_crops"]
        b = g.shape[0] // N_GLOBAL
        total = self.teacher_step_flops(batch)
        for name, s in self.students.items():
            c = self.layout.images_per_rank(name, b * self.layout.world_size)
            key = (name, g.shape[-1], loc.shape[-1] if loc.numel() else 0)
            if key not in self._flops:
                per_g = backbone_forward_flops(s.model_cfg, g.shape[-1])
                per_l = backbone_forward_flops(s.model_cfg, loc.shape[-1]) if loc.numel() else 0.0
                self._flops[key] = N_GLOBAL * per_g + self.crops.n_local * per_l
            total += 3.0 * c * self._flops[key]
        return total

    # ------------------------------------------------------------------ outputs

    def exports(self) -> dict[str, Exportable]:
        """Each local student's EMA backbone, written by the student's first rank with a card
        naming the teacher (path and weights hash), the data and the recipe."""
        cfg = self.cfg
        out: dict[str, Exportable] = {}
        for name, student in self.students.items():
            card = {"teacher": self.teacher_info, "mean": list(cfg.crops.mean),
                    "std": list(cfg.crops.std),
                    "objective": f"distillation ({self.mode} mode) from "
                                 f"{self.teacher_info['path']}",
                    "distillation": {"student": name, "arch": student.model_cfg.arch,
                                     "mode": self.mode, "mask_student": cfg.loss.mask_student}}
            build = (lambda c=student.model_cfg: backbone_from_config(c))
            out[name] = Exportable(student.ema, build, card,
                                   rank=self.layout.ranges[name].start,
                                   formats=list(cfg.export_formats),
                                   evaluate=self._final_knn if self._wants_knn() else None)
        return out

    def periodic_eval_modules(self) -> dict[str, tuple[nn.Module, Any]]:
        """Each local student's EMA (what gets exported), logged as ``<student>/...`` and
        evaluated over the student's own ranks only (its subgroup; the world when every student
        is on every rank), so a logged value is always that student's."""
        return {f"{name}/": (s.ema, self.layout.groups[name])
                for name, s in self.students.items()}

    def _wants_knn(self) -> bool:
        return bool(self.cfg.eval.knn_train and self.cfg.eval.knn_val)

    def _final_knn(self, model: nn.Module) -> dict[str, Any]:
        """kNN of an exported student on ``eval.knn_train`` / ``eval.knn_val`` (model card)."""
        from dinosys.train.periodic_eval import periodic_evaluators

        ev, crops = self.cfg.eval, self.cfg.crops
        if self._knn is None:  # the registry's kNN at the crops' size; folders decoded once
            only_knn = dataclasses.replace(ev, knn_every_n_steps=1, zeroshot_every_n_steps=0)
            self._knn = periodic_evaluators(only_knn, crops.mean, crops.std,
                                            crops.global_size)[0]
        self._knn.evaluate(model, "cpu")  # the export's module, built on the CPU
        res = self._knn.last
        out: dict[str, Any] = {f"knn_top1_k{k}": v for k, v in res["top1"].items()}
        out["command"] = (f"dinosys eval knn --model THIS_DIR --train {ev.knn_train} "
                          f"--val {ev.knn_val}")
        return out

    def run_summary(self, summary: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
        """The objective, the teacher and per student: its last logged values, its export
        (``export``) and its final kNN (``knn_top1``: k -> top-1) when evaluated."""
        students: dict[str, dict[str, Any]] = {}
        for name in self.layout.ranges:
            entry = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith(f"{name}/")}
            if name in summary.get("exports", {}):
                entry["export"] = summary["exports"][name]
            evaluation = summary.get("evaluations", {}).get(name, {})
            knn = {int(k.rsplit("_k", 1)[1]): v for k, v in evaluation.items()
                   if k.startswith("knn_top1_k")}
            if knn:
                entry["knn_top1"] = knn
            students[name] = entry
        return {"mode": self.mode, "teacher": self.teacher_info, "students": students}
