"""iBOT masked-patch loss: teacher patch targets vs student patch logits at masked positions."""

from __future__ import annotations

from torch import Tensor

from dinosys.losses.soft_ce import soft_cross_entropy


def ibot_loss(
    student_masked_logits: Tensor,
    teacher_masked_probs: Tensor,
    mask_weights: Tensor,
    n_global_images: int,
    student_temp: float = 0.1,
) -> Tensor:
    """sum_i w_i * CE(p_i, z_i / temp) / n_global_images, in fp32.

    Args:
        student_masked_logits: (M, K) student patch logits at the masked positions.
        teacher_masked_probs: (M, K) teacher target probabilities at the same positions.
        mask_weights: (M,) per-token weights, 1 / (#masked patches in the token's image).
        n_global_images: the number of global-crop images on this rank (2B), masked or not.
        student_temp: temperature of the student softmax.

    CE(p, z) = -sum_k p_k log softmax(z)_k. With M == 0 the result is a zero that is still
    connected to `student_masked_logits` (backward works and gives zero gradients).
    """
    if not student_temp > 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    if n_global_images < 1:
        raise ValueError(f"n_global_images must be >= 1, got {n_global_images}")
    shape = student_masked_logits.shape
    if student_masked_logits.dim() != 2 or shape != teacher_masked_probs.shape:
        raise ValueError(
            "student masked logits and teacher masked probs must both be (M, K), got "
            f"{tuple(student_masked_logits.shape)} and {tuple(teacher_masked_probs.shape)}"
        )
    if mask_weights.shape != student_masked_logits.shape[:1]:
        raise ValueError(
            f"mask_weights must be (M,) = ({student_masked_logits.shape[0]},), "
            f"got {tuple(mask_weights.shape)}"
        )
    per_token = soft_cross_entropy(student_masked_logits, teacher_masked_probs, student_temp)
    return (per_token * mask_weights.detach().to(per_token.dtype)).sum() / n_global_images
