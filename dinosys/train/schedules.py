"""Per-step schedules of DINOv2 training: lr, weight decay, teacher momentum and temperature.

Schedules are pure functions of the global optimisation step, so that a resumed run only needs
the step number to land on exactly the same values. A DINOv2 "epoch" is ``optim.iters_per_epoch``
steps, independent of the data set size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dinosys.config import OptimConfig, SSLLossConfig


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


@dataclass(frozen=True)
class ScheduleValues:
    """All scheduled values at one step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    last_layer_frozen: bool

    def as_dict(self) -> dict[str, float]:
        """For logging."""
        return {"lr": self.lr, "wd": self.weight_decay, "momentum": self.momentum,
                "teacher_temp": self.teacher_temp}


class TrainSchedules:
    """The DINOv2 schedules for a run of ``total_steps`` steps at global batch ``total_batch``."""

    def __init__(self, optim: OptimConfig, loss: SSLLossConfig, total_steps: int,
                 total_batch: int) -> None:
        self.optim = optim
        self.loss = loss
        self.total_steps = int(total_steps)
        ipe = optim.iters_per_epoch
        self.peak_lr = scaled_lr(optim.base_lr, total_batch, optim.reference_batch,
                                 optim.lr_scaling)
        self.warmup_steps = int(round(optim.warmup_epochs * ipe))
        self.teacher_temp_warmup_steps = int(round(loss.warmup_teacher_temp_epochs * ipe))
        self.freeze_last_layer_steps = int(round(optim.freeze_last_layer_epochs * ipe))

    def lr(self, step: int) -> float:
        """Linear warmup from 0 to the scaled peak, then cosine to ``min_lr``."""
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.peak_lr,
                             self.optim.min_lr)

    def weight_decay(self, step: int) -> float:
        """Cosine ``weight_decay -> weight_decay_end`` over the run."""
        return cosine(step, self.total_steps, self.optim.weight_decay,
                      self.optim.weight_decay_end)

    def momentum(self, step: int) -> float:
        """Teacher EMA momentum, cosine ``momentum_teacher -> final_momentum_teacher``."""
        return cosine(step, self.total_steps, self.optim.momentum_teacher,
                      self.optim.final_momentum_teacher)

    def teacher_temp(self, step: int) -> float:
        """Teacher temperature: linear warmup, then constant."""
        return linear_then_constant(step, self.teacher_temp_warmup_steps,
                                    self.loss.warmup_teacher_temp, self.loss.teacher_temp)

    def at(self, step: int) -> ScheduleValues:
        """Every scheduled value at ``step`` (0-based: the step about to be taken)."""
        return ScheduleValues(
            lr=self.lr(step), weight_decay=self.weight_decay(step), momentum=self.momentum(step),
            teacher_temp=self.teacher_temp(step),
            last_layer_frozen=step < self.freeze_last_layer_steps,
        )
