"""Teacher EMA: foreach update on (local) tensors equals the textbook formula."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dinosys.train.ema import ema_pairs, ema_update


def test_ema_matches_reference() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    expected = {n: 0.9 * t + 0.1 * s for (n, t), s in
                zip(teacher.state_dict().items(), student.state_dict().values())}
    t_list, s_list = ema_pairs(teacher, student)
    ema_update(t_list, s_list, 0.9)
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, expected[name])


def test_ema_momentum_one_keeps_teacher() -> None:
    student, teacher = nn.Linear(3, 3), nn.Linear(3, 3)
    before = copy.deepcopy(teacher.state_dict())
    ema_update(*ema_pairs(teacher, student), 1.0)
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[name])


def test_ema_refuses_mismatched_models() -> None:
    with pytest.raises(RuntimeError, match="differ"):
        ema_pairs(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3)))
