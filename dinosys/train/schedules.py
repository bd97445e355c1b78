"""Per-step schedules: the loop's lr and weight decay, and the functions tasks build theirs from.

Schedules are pure functions of the global optimisation step, so that a resumed run only needs
the step number to land on exactly the same values. A DINOv2 "epoch" is ``optim.iters_per_epoch``
steps, independent of the data set size.
"""

from __future__ import annotations

import math

from dinosys.train.optim import OptimConfig


def scaled_lr(base_lr: float, total_batch: int, reference_batch: int, rule: str) -> float:
    """Peak lr for a global batch: ``base*sqrt(B/ref)`` (sqrt), ``base*B/ref`` or ``base``."""
    ratio = total_batch / reference_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "linear":
        return base_lr * ratio
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}")


def cosine(step: float, total: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total``), clamped beyond."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final: float,
                  start: float = 0.0) -> float:
    """Linear warmup ``start -> peak`` over ``warmup`` steps, then cosine ``peak -> final``."""
    if warmup > 0 and step < warmup:
        return start + (peak - start) * step / warmup
    return cosine(step - warmup, max(total - warmup, 0), peak, final)


def linear_then_constant(step: int, warmup: int, start: float, end: float) -> float:
    """Linear ``start -> end`` over ``warmup`` steps, then ``end``."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


class LrSchedule:
    """The loop's schedules for a run of ``total_steps`` steps at global batch ``total_batch``:
    lr (linear warmup to the scaled peak, then cosine to ``min_lr``) and weight decay (cosine).
    A task's own schedules (teacher temperature, EMA momentum ...) live in the task and use the
    same functions."""

    def __init__(self, optim: OptimConfig, total_steps: int, total_batch: int) -> None:
        self.optim = optim
        self.total_steps = int(total_steps)
        self.peak_lr = scaled_lr(optim.base_lr, total_batch, optim.reference_batch,
                                 optim.lr_scaling)
        self.warmup_steps = epochs_to_steps(optim.warmup_epochs, optim)

    def lr(self, step: int) -> float:
        """Linear warmup from 0 to the scaled peak, then cosine to ``min_lr``."""
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.peak_lr,
                             self.optim.min_lr)

    def weight_decay(self, step: int) -> float:
        """Cosine ``weight_decay -> weight_decay_end`` over the run."""
        return cosine(step, self.total_steps, self.optim.weight_decay,
                      self.optim.weight_decay_end)

    def at(self, step: int) -> dict[str, float]:
        """``{"lr", "wd"}`` at ``step`` (0-based: the step about to be taken), for logging."""
        return {"lr": self.lr(step), "wd": self.weight_decay(step)}


def epochs_to_steps(epochs: float, optim: OptimConfig) -> int:
    """A duration in DINOv2 "epochs" (``optim.iters_per_epoch`` steps each) as steps."""
    return int(round(epochs * optim.iters_per_epoch))
