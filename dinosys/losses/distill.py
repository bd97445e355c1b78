"""Feature distillation from a backbone without heads (e.g. released DINOv2 weights).

The student matches the teacher's final-norm cls and patch tokens of the same view. Both sides
are normalised per token (zero mean, unit variance over the feature dimension, no affine: the
teacher's per-token scale says nothing the student should copy), and the student is first
mapped to the teacher's width by a learned linear projection when the widths differ. Per token
the loss is ``cosine_weight * (1 - cos(s, t)) + smooth_l1_weight * smooth_l1(s, t)`` (smooth-L1
averaged over the feature dimension), averaged over tokens; the cls and patch terms are
weighted and summed. Computed in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinosys.losses._precision import at_least_fp32


class FeatureLossTerms(NamedTuple):
    """``loss`` is what to optimise; ``cls`` and ``patch`` are detached, for logging."""

    loss: Tensor
    cls: Tensor
    patch: Tensor


def normalize_tokens(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-token standardisation over the last dimension (layer norm without affine), fp32."""
    x = at_least_fp32(x)
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def token_distill_loss(student: Tensor, teacher: Tensor, cosine_weight: float = 1.0,
                       smooth_l1_weight: float = 1.0, beta: float = 1.0) -> Tensor:
    """Mean over tokens of ``cosine_weight * (1 - cos) + smooth_l1_weight * smooth_l1``.

    ``student`` and ``teacher`` are (..., D) tokens of the same shape, normalised here.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher tokens must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.numel() == 0:
        return student.sum() * 0.0
    s = normalize_tokens(student)
    t = normalize_tokens(teacher.detach())
    loss = s.new_zeros(())
    if cosine_weight:
        loss = loss + cosine_weight * (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if smooth_l1_weight:
        loss = loss + smooth_l1_weight * F.smooth_l1_loss(s, t, beta=beta)
    return loss


class FeatureDistillLoss(nn.Module):
    """cls + patch feature distillation with a learned projection (trainable, student-owned).

    ``student_dim != teacher_dim``: a ``Linear(student_dim, teacher_dim)`` shared by cls and
    patch tokens (trained with the student, checkpointed with it, never exported). Equal
    widths: identity, no parameters.
    """

    def __init__(self, student_dim: int, teacher_dim: int, cls_weight: float = 1.0,
                 patch_weight: float = 1.0, cosine_weight: float = 1.0,
                 smooth_l1_weight: float = 1.0, smooth_l1_beta: float = 1.0) -> None:
        super().__init__()
        for name, value in (("cls_weight", cls_weight), ("patch_weight", patch_weight),
                            ("cosine_weight", cosine_weight),
                            ("smooth_l1_weight", smooth_l1_weight)):
            if value < 0:
                raise ValueError(f"feature distillation {name} must be >= 0, got {value}")
        if cls_weight + patch_weight <= 0 or cosine_weight + smooth_l1_weight <= 0:
            raise ValueError("feature distillation needs a positive cls or patch weight and a "
                             "positive cosine or smooth-L1 weight")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.proj: nn.Module
        if student_dim != teacher_dim:
            self.proj = nn.Linear(student_dim, teacher_dim)
            nn.init.trunc_normal_(self.proj.weight, std=0.02)
            nn.init.zeros_(self.proj.bias)
        else:
            self.proj = nn.Identity()
        self.cls_weight, self.patch_weight = cls_weight, patch_weight
        self.cosine_weight, self.smooth_l1_weight = cosine_weight, smooth_l1_weight
        self.beta = smooth_l1_beta

    def forward(self, student_cls: Tensor, student_patches: Tensor, teacher_cls: Tensor,
                teacher_patches: Tensor) -> FeatureLossTerms:
        """Student (B, Ds) cls and (B, N, Ds) patches vs teacher (B, Dt) and (B, N, Dt)."""
        if student_patches.shape[:2] != teacher_patches.shape[:2]:
            raise ValueError(f"student and teacher patch grids differ: "
                             f"{tuple(student_patches.shape[:2])} vs "
                             f"{tuple(teacher_patches.shape[:2])} (same patch size needed)")
        kw = dict(cosine_weight=self.cosine_weight, smooth_l1_weight=self.smooth_l1_weight,
                  beta=self.beta)
        zero = student_cls.new_zeros((), dtype=torch.float32)
        # one projection call for cls and patches: FSDP2 runs a sharded module's forward once
        # per step (a second call desynchronised the ranks' gradient reductions); on 2-D rows,
        # so that the FSDP module returns a fresh tensor: on (B, N, D) nn.Linear returns a view,
        # whose pre-backward hook FSDP2 can lose (its all-gather skipped, the ranks'
        # collectives out of step: gloo "24 vs 4 bytes")
        x = torch.cat([student_cls[:, None], student_patches], dim=1)
        tokens = self.proj(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        s_cls, s_patches = tokens[:, 0], tokens[:, 1:]
        cls = token_distill_loss(s_cls, teacher_cls, **kw) if self.cls_weight else zero
        patch = (token_distill_loss(s_patches, teacher_patches, **kw)
                 if self.patch_weight else zero)
        loss = self.cls_weight * cls + self.patch_weight * patch
        return FeatureLossTerms(loss, cls.detach(), patch.detach())
