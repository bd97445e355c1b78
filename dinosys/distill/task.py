"""The distillation task: one frozen teacher forward per global batch, several students.

Per step, every rank runs the teacher on its slice of the global batch, the teacher outputs
and crops are routed to the students' ranks (:mod:`dinosys.distill.ranks`), and each student
this rank trains computes its loss on its chunk (:mod:`dinosys.distill.student`); the
backpropagated loss is their sum (students share no parameters, so each gets its own
gradient). Logged values are per student, prefixed ``<name>/``, and world-averaged into each
student's subgroup mean (see :meth:`DistillTask.world_logs`).
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dinosys.distill.config import DistillLossConfig, StudentConfig, TeacherConfig
from dinosys.distill.ranks import RankLayout, build_layout, to_crop_major, to_image_major
from dinosys.distill.student import N_GLOBAL, Student
from dinosys.distill.teacher import Teacher, load_teacher, place_teacher
from dinosys.errors import UserError
from dinosys.models import backbone_forward_flops, resolve_config

log = logging.getLogger(__name__)

TEACHER_KEYS = {"heads": ("cls_bottleneck", "patch_bottleneck"), "features": ("cls", "patches")}


def resolve_mode(mode: str, teacher: Teacher) -> str:
    """``auto`` -> ``heads`` when the teacher has DINO/iBOT heads, else ``features``."""
    if mode == "auto":
        return "heads" if teacher.has_heads else "features"
    if mode == "heads" and not teacher.has_heads:
        raise UserError(f"teacher {teacher.path} has no DINO/iBOT heads ({teacher.kind}): "
                        "loss.mode=heads needs a dinosys run or checkpoint; use "
                        "loss.mode=features to distill its backbone features")
    return mode


def check_compatible(teacher: Teacher, students: list[StudentConfig], crops: Any,
                     mode: str) -> None:
    """Reject what cannot work before any training (one-line UserError); warn on a student
    larger than its teacher."""
    for name, ours, theirs in (("mean", crops.mean, teacher.mean), ("std", crops.std, teacher.std)):
        if len(ours) != len(theirs) or any(abs(a - b) > 1e-3 for a, b in zip(ours, theirs)):
            raise UserError(f"teacher {teacher.path} expects images normalised with {name} "
                            f"{list(theirs)} but the data uses crops.{name}={list(ours)}: set "
                            f"crops.mean/crops.std to the teacher's")
    p = teacher.patch_size
    if crops.global_size % p:
        raise UserError(f"crops.global_size={crops.global_size} is not a multiple of the "
                        f"teacher's patch size {p}")
    t_params = sum(x.numel() for x in teacher.backbone.parameters())
    for s in students:
        cfg = resolve_config(s.model)
        if cfg.patch_size != p:
            raise UserError(f"student '{s.name}' has patch size {cfg.patch_size} but the "
                            f"teacher has {p}: patch targets need the same token grid")
        if crops.n_local and crops.local_size % cfg.patch_size:
            raise UserError(f"crops.local_size={crops.local_size} is not a multiple of student "
                            f"'{s.name}' patch size {cfg.patch_size}")
        width, depth = cfg.embed_dim, cfg.depth
        if width * width * depth > teacher.embed_dim ** 2 * teacher.backbone.n_blocks:
            log.warning("student '%s' (%s, width %d, depth %d) is larger than its teacher "
                        "(%d parameters): allowed, but distillation usually shrinks models",
                        s.name, cfg.arch, width, depth, t_params)
    if mode == "heads" and teacher.head_cfg is None:
        raise UserError(f"teacher {teacher.path} has no heads: use loss.mode=features")


class DistillTask:
    """Frozen teacher + the students of this rank (see the module docstring)."""

    name = "distill"

    def __init__(self, teacher_cfg: TeacherConfig, students: list[StudentConfig],
                 loss: DistillLossConfig, crops: Any, device: torch.device,
                 rank: int = 0, world_size: int = 1, teacher: Teacher | None = None,
                 seed: int = 0) -> None:
        names = [s.name for s in students]
        if len(set(names)) != len(names):
            raise UserError(f"student names must be unique, got {names}")
        self.device = torch.device(device)
        teacher = teacher or load_teacher(teacher_cfg.path, teacher_cfg.arch,
                                          teacher_cfg.num_heads)
        self.mode = resolve_mode(loss.mode, teacher)
        check_compatible(teacher, students, crops, self.mode)
        self.teacher_info = teacher.describe()
        self.layout: RankLayout = build_layout({s.name: s.ranks for s in students},
                                               world_size, rank)
        self.student_cfgs = {s.name: s for s in students}
        self.students: dict[str, Student] = {}
        for name in self.layout.local_students:
            # the same initial weights on every rank of the student and in any layout
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + zlib.crc32(name.encode()))
                student = Student(self.student_cfgs[name], teacher, loss, self.mode,
                                  self.layout.groups[name])
            self.students[name] = student.to(self.device)
        self.teacher = place_teacher(teacher, self.device, teacher_cfg.dtype)
        self.loss_cfg, self.crops = loss, crops
        self.patch_size = teacher.patch_size
        self._flops: dict[tuple, float] = {}

    # ------------------------------------------------------------------ modules

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Every local student's trainable modules, keyed ``<student>-<part>`` (clipped one by
        one, as DINOv2 clips backbone and heads)."""
        return {f"{name}-{part}": module for name, s in self.students.items()
                for part, module in s.modules.items()}

    def backbone_depth(self) -> int:
        """Deepest local student (the loop's default groups; replaced per student)."""
        return max(s.depth for s in self.students.values())

    def export_backbone(self) -> nn.Module:
        """The first local student's EMA backbone (periodic kNN)."""
        return next(iter(self.students.values())).ema

    def student_modules(self, name: str) -> Mapping[str, nn.Module]:
        """One student's trainable modules (backbone under ``backbone``)."""
        return self.students[name].modules

    def ema_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(EMA backbone, student backbone)`` per local student."""
        return [(s.ema, s.backbone) for s in self.students.values()]

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

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def teacher_outputs(self, global_crops: Tensor) -> dict[str, Tensor]:
        """The teacher on this rank's global crops: the targets this mode needs, crop-major."""
        out = self.teacher.encode(global_crops)
        return {k: out[k] for k in TEACHER_KEYS[self.mode]}

    def route(self, batch: Mapping[str, Any], t_out: Mapping[str, Tensor]
              ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Crops, masks and teacher outputs of this rank's student chunk (crop-major)."""
        dev = self.device
        n_local = self.crops.n_local
        parts = {"global_crops": (batch["global_crops"].to(dev, non_blocking=True), N_GLOBAL),
                 "masks": (batch["masks"].to(dev, non_blocking=True), N_GLOBAL)}
        local = batch["local_crops"]
        if n_local and local.numel():
            parts["local_crops"] = (local.to(dev, non_blocking=True), n_local)
        for key, value in t_out.items():
            parts[key] = (value, N_GLOBAL)
        routed = {k: to_crop_major(self.layout.exchange(to_image_major(v, n)))
                  for k, (v, n) in parts.items()}
        routed.setdefault("local_crops", torch.empty(0, device=dev))
        crops = {k: routed.pop(k) for k in ("global_crops", "local_crops", "masks")}
        return crops, routed

    def forward_loss(self, batch: Mapping[str, Any], sched: Any) -> dict[str, Any]:
        """Teacher once, then each local student on the same routed targets."""
        t_out = self.teacher_outputs(batch["global_crops"].to(self.device, non_blocking=True))
        crops, targets = self.route(batch, t_out)
        total: Tensor | None = None
        logs: dict[str, Any] = {}
        for name, student in self.students.items():
            out = student.forward_loss(crops, targets, sched.teacher_temp)
            total = out["loss"] if total is None else total + out["loss"]
            logs.update({f"{name}/{k}": v for k, v in out.items()})
        assert total is not None  # every rank trains at least one student (layout check)
        return {"loss": total, **logs}

    def world_logs(self, logs: Mapping[str, float]) -> dict[str, float]:
        """Per-rank logs -> values whose world mean is each student's subgroup mean.

        Every rank reports every student's keys (the world average needs one layout): a local
        student's values are scaled by world/n_ranks(student), others are 0.
        """
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
        terms = (("loss", "dino_loss", "ibot_loss", "koleo_loss") if self.mode == "heads"
                 else ("loss", "cls_loss", "patch_loss", "koleo_loss"))
        keys = [f"{name}/{t}" for t in terms]
        parts = ["backbone"]
        if self.mode == "heads":
            parts.append("dino_head")
            if self.teacher.head_cfg is not None and self.teacher.head_cfg.ibot_separate_head:
                parts.append("ibot_head")
        else:
            cfg = resolve_config(self.student_cfgs[name].model)
            if cfg.embed_dim != self.teacher.embed_dim:
                parts.append("proj")
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

    def export_backbones(self) -> dict[str, nn.Module]:
        """Each local student's EMA backbone (what gets exported)."""
        return {name: s.ema for name, s in self.students.items()}

    def student_model_config(self, name: str) -> Any:
        """The resolved backbone config of a student (for rebuilding its export)."""
        return dataclasses.replace(self.students[name].model_cfg)
