"""Checks of a distillation job that need the loaded teacher (one-line UserError, before any
training): the objective it allows, and whether students and data fit it."""

from __future__ import annotations

import logging
from typing import Any

from dinosys.distill.config import StudentConfig
from dinosys.distill.teacher import Teacher
from dinosys.errors import UserError
from dinosys.models import resolve_config

log = logging.getLogger(__name__)


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
