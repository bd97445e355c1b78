"""DINO cross-view loss: teacher global-crop targets vs student logits of every other crop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from dinosys.losses._precision import at_least_fp32
from dinosys.losses.soft_ce import soft_cross_entropy


class DINOLossTerms(NamedTuple):
    """`loss` is what to optimise; the rest is for logging (all detached except `loss`)."""

    loss: Tensor  # mean over all (teacher global t, student crop s != t) pairs
    global_loss: Tensor  # mean over the global-global pairs (0 if there are none)
    local_loss: Tensor  # mean over the global-local pairs (0 if there are no local crops)
    n_pairs: int


def dino_loss(
    student_global_logits: Tensor,
    teacher_probs: Tensor,
    student_local_logits: Tensor | None = None,
    n_global_crops: int = 2,
    student_temp: float = 0.1,
) -> DINOLossTerms:
    """DINO loss on crop-major stacked tensors.

    Args:
        student_global_logits: (G*B, K) student logits of the G global crops, crop-major
            (all images' crop 0, then crop 1, ...).
        teacher_probs: (G*B, K) teacher target probabilities of the same global crops, in the
            same order (output of centering or Sinkhorn-Knopp).
        student_local_logits: (L*B, K) student logits of the L local crops, crop-major, or
            None / an empty tensor when there are none.
        n_global_crops: G.
        student_temp: temperature of the student softmax.

    Returns the sum over pairs (t, s != t) of mean_b[-sum_k p_t log softmax(z_s / temp)],
    divided by the number of pairs G*(G+L) - G, computed in fp32 without a loop over pairs
    (two soft-target cross-entropy calls in all).
    """
    if not student_temp > 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    if student_global_logits.shape != teacher_probs.shape or student_global_logits.dim() != 2:
        raise ValueError(
            "student global logits and teacher probs must both be (G*B, K), got "
            f"{tuple(student_global_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    n_rows, n_prototypes = teacher_probs.shape
    if n_global_crops < 1 or n_rows % n_global_crops:
        raise ValueError(f"{n_rows} global rows do not split into {n_global_crops} crops")
    batch = n_rows // n_global_crops
    if batch == 0:
        raise ValueError("dino_loss needs at least one image")
    probs = at_least_fp32(teacher_probs.detach()).reshape(n_global_crops, batch, n_prototypes)
    probs_all_views = probs.sum(dim=0)  # (B, K): sum over teacher views t

    # Pairs with s a global crop: every teacher view except s itself.
    others = probs.flip(0) if n_global_crops == 2 else probs_all_views - probs
    student_global = student_global_logits.reshape(n_global_crops, batch, n_prototypes)
    global_sum = soft_cross_entropy(student_global, others, student_temp).sum()
    n_global_pairs = n_global_crops * (n_global_crops - 1)

    local_sum = global_sum.new_zeros(())
    n_local_pairs = 0
    if student_local_logits is not None and student_local_logits.numel() > 0:
        if student_local_logits.dim() != 2 or student_local_logits.shape[1] != n_prototypes:
            raise ValueError(
                f"student local logits must be (L*B, {n_prototypes}), "
                f"got {tuple(student_local_logits.shape)}"
            )
        if student_local_logits.shape[0] % batch:
            raise ValueError(
                f"{student_local_logits.shape[0]} local rows are not a multiple of B={batch}"
            )
        n_local = student_local_logits.shape[0] // batch
        # Every local crop is paired with every teacher view: one summed (B, K) target,
        # broadcast over the L crops (CE is linear in the target).
        student_local = student_local_logits.reshape(n_local, batch, n_prototypes)
        local_sum = soft_cross_entropy(student_local, probs_all_views, student_temp).sum()
        n_local_pairs = n_global_crops * n_local

    n_pairs = n_global_pairs + n_local_pairs
    if n_pairs == 0:
        raise ValueError("dino_loss needs 2 global crops or at least one local crop")
    loss = (global_sum + local_sum) / (batch * n_pairs)
    with torch.no_grad():
        global_loss = global_sum / (batch * max(n_global_pairs, 1))
        local_loss = local_sum / (batch * max(n_local_pairs, 1))
    return DINOLossTerms(loss, global_loss.detach(), local_loss.detach(), n_pairs)


def dino_loss_from_crops(
    student_logits: Sequence[Tensor],
    teacher_probs: Sequence[Tensor],
    student_temp: float = 0.1,
) -> DINOLossTerms:
    """DINO loss from per-crop lists.

    `student_logits`: one (B, K) tensor per crop, the G global crops first (in the order of
    `teacher_probs`), then the local crops. `teacher_probs`: one (B, K) per global crop.
    """
    n_global = len(teacher_probs)
    if len(student_logits) < n_global:
        raise ValueError(f"{len(student_logits)} student crops but {n_global} teacher crops")
    local = list(student_logits[n_global:])
    return dino_loss(
        torch.cat(list(student_logits[:n_global])),
        torch.cat(list(teacher_probs)),
        torch.cat(local) if local else None,
        n_global_crops=n_global,
        student_temp=student_temp,
    )
