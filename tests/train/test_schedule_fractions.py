"""Fractional "epochs" (e.g. warmup_epochs=0.5) become round(epochs * iters_per_epoch) steps for
every schedule: lr warm-up, teacher-temperature warm-up and the last-layer freeze."""

from __future__ import annotations

import math

import pytest

from dinosys.config import load_config
from dinosys.train.schedules import LrSchedule
from dinosys.train.tasks.ssl import SSLConfig, SSLSchedules


def test_fractional_epochs_are_rounded_to_steps() -> None:
    cfg = load_config(SSLConfig, None, [
        "optim.iters_per_epoch=10", "optim.warmup_epochs=0.5", "optim.base_lr=4e-3",
        "optim.reference_batch=256", "optim.freeze_last_layer_epochs=0.35",
        "loss.warmup_teacher_temp_epochs=1.5", "loss.warmup_teacher_temp=0.04",
        "loss.teacher_temp=0.07"], kind="train")
    s = LrSchedule(cfg.optim, total_steps=100, total_batch=256)  # the loop's
    ssl = SSLSchedules(cfg.optim, cfg.loss, total_steps=100)  # the SSL task's own
    peak = 4e-3
    assert s.lr(2) == pytest.approx(peak * 2 / 5)  # 5 warm-up steps
    assert s.lr(5) == pytest.approx(peak)
    assert s.lr(6) == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi / 95)))
    assert ssl.teacher_temp(5) == pytest.approx(0.04 + 0.03 * 5 / 15)  # 15 warm-up steps
    assert ssl.teacher_temp(15) == pytest.approx(0.07)
    # 3.5 steps round to 4 frozen steps (not truncated to 3)
    assert [ssl.last_layer_frozen(i) for i in range(6)] == [True] * 4 + [False] * 2
