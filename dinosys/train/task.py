"""The task interface shared by SSL, CLIP and distillation training.

A task owns its models and losses and turns a batch into a loss dict. The loop owns everything
else: optimizer, schedules, the EMA hook, gradient clipping, logging, checkpoints, evaluation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dinosys.train.schedules import ScheduleValues


class TrainTask(ABC):
    """What the training loop needs from a task."""

    #: images per sample that go through the trained backbone (for throughput figures)
    name: str = "task"

    @abstractmethod
    def trainable_modules(self) -> Mapping[str, nn.Module]:
        """Modules the optimizer trains, by name; each is clipped separately. The backbone is
        under ``"backbone"`` (layer-wise lr decay applies to it; everything else is a head)."""

    @abstractmethod
    def backbone_depth(self) -> int:
        """Number of transformer blocks of the trained backbone (for layer-wise lr decay)."""

    def ema_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(teacher, student)`` pairs the loop updates by EMA after each optimizer step."""
        return []

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Every module whose weights a checkpoint holds, by name."""
        return dict(self.trainable_modules())

    @abstractmethod
    def forward_loss(self, batch: Mapping[str, Any], sched: ScheduleValues) -> dict[str, Any]:
        """One forward pass. Returns ``{"loss": scalar tensor to backpropagate, ...}`` where the
        other entries are scalar tensors or floats to log (loss terms, collapse statistics)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Non-parameter state to checkpoint (e.g. the teacher centre), as tensors."""
        return {}

    def load_extra_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_state` returned (nothing to restore by default)."""
        del state

    def step_flops(self, batch: Mapping[str, Any]) -> float:
        """Model FLOPs of one training step on ``batch`` on this rank (0 if unknown)."""
        return 0.0

    @abstractmethod
    def export_backbone(self) -> nn.Module:
        """The backbone to export at the end (the EMA teacher for SSL)."""
