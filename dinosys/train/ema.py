"""Teacher EMA update: ``t <- m * t + (1 - m) * s`` on matching (possibly sharded) parameters.

Student and teacher are sharded identically by FSDP2, so each rank updates its own local shards
in one pass (``lerp``, reading each tensor once): no gathers, no communication.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def ema_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor],
                                                               list[torch.Tensor]]:
    """Matching local parameter tensors of ``teacher`` and ``student`` (same names, same shapes)."""
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        missing = sorted(set(t_params) ^ set(s_params))[:5]
        raise RuntimeError(f"teacher and student parameters differ: {missing}")
    t_list, s_list = [], []
    for name, tp in t_params.items():
        t_loc, s_loc = local_tensor(tp.data), local_tensor(s_params[name].data)
        if t_loc.shape != s_loc.shape:
            raise RuntimeError(f"teacher/student shard shapes differ for {name}: "
                               f"{tuple(t_loc.shape)} vs {tuple(s_loc.shape)}")
        t_list.append(t_loc)
        s_list.append(s_loc)
    return t_list, s_list


@torch.no_grad()
def ema_update(teacher_tensors: Sequence[torch.Tensor], student_tensors: Sequence[torch.Tensor],
               momentum: float, apply: torch.Tensor | None = None) -> None:
    """In place: ``teacher = momentum * teacher + (1 - momentum) * student``, in one pass.

    ``apply`` (a 0-d 0/1 device tensor, e.g. "this step was finite") scales the update without
    a host sync: 0 leaves the teacher as it was.
    """
    if not teacher_tensors:
        return
    teacher, student = list(teacher_tensors), list(student_tensors)
    if apply is None:
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)
        return
    by_dtype: dict[tuple, torch.Tensor] = {}
    weights = []
    for t in teacher:  # one weight tensor per (device, dtype), shared by its tensors
        key = (t.device, t.dtype)
        if key not in by_dtype:
            by_dtype[key] = (apply.to(t.device, torch.float32) * (1.0 - momentum)).to(t.dtype)
        weights.append(by_dtype[key])
    torch._foreach_lerp_(teacher, student, weights)
