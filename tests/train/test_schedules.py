"""Schedules: values at the key steps of a DINOv2 run."""

from __future__ import annotations

import math

import pytest

from dinosys.train.schedules import LrSchedule, scaled_lr
from dinosys.train.tasks.ssl import SSLLossConfig, SSLOptimConfig, SSLSchedules


def test_lr_scaling_rules() -> None:
    assert scaled_lr(4e-3, 256, 1024, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(4e-3, 256, 1024, "linear") == pytest.approx(1e-3)
    assert scaled_lr(4e-3, 256, 1024, "none") == pytest.approx(4e-3)


class Both:
    """The loop's lr / wd schedule and the SSL task's own values, side by side."""

    def __init__(self, lr: LrSchedule, ssl: SSLSchedules) -> None:
        self.lr, self.weight_decay = lr.lr, lr.weight_decay
        self.momentum, self.teacher_temp = ssl.momentum, ssl.teacher_temp
        self.last_layer_frozen = ssl.last_layer_frozen


def make(total: int = 1000) -> Both:
    optim = SSLOptimConfig(base_lr=4e-3, reference_batch=1024, min_lr=1e-6, iters_per_epoch=10,
                        warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
                        momentum_teacher=0.992, final_momentum_teacher=1.0,
                        freeze_last_layer_epochs=1)
    loss = SSLLossConfig(warmup_teacher_temp=0.04, teacher_temp=0.07,
                         warmup_teacher_temp_epochs=30)
    return Both(LrSchedule(optim, total_steps=total, total_batch=256),
                SSLSchedules(optim, loss, total_steps=total))


def test_lr_warmup_then_cosine() -> None:
    s = make()
    peak = 4e-3 * math.sqrt(256 / 1024)
    assert s.lr(0) == 0.0
    assert s.lr(50) == pytest.approx(peak / 2)
    assert s.lr(100) == pytest.approx(peak)
    mid = 100 + (1000 - 100) // 2
    assert s.lr(mid) == pytest.approx(1e-6 + (peak - 1e-6) / 2)
    assert s.lr(1000) == pytest.approx(1e-6)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(100, 999))


def test_weight_decay_momentum_and_teacher_temp() -> None:
    s = make()
    assert s.weight_decay(0) == pytest.approx(0.04)
    assert s.weight_decay(500) == pytest.approx(0.22)
    assert s.weight_decay(1000) == pytest.approx(0.4)
    assert s.momentum(0) == pytest.approx(0.992)
    assert s.momentum(500) == pytest.approx(0.996)
    assert s.momentum(1000) == pytest.approx(1.0)
    assert s.teacher_temp(0) == pytest.approx(0.04)
    assert s.teacher_temp(150) == pytest.approx(0.055)
    assert s.teacher_temp(300) == pytest.approx(0.07)
    assert s.teacher_temp(900) == pytest.approx(0.07)


def test_last_layer_frozen_for_the_first_epochs() -> None:
    s = make()
    assert s.last_layer_frozen(0) and s.last_layer_frozen(9)
    assert not s.last_layer_frozen(10)
