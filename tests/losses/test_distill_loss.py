"""Feature distillation loss: normalisation, projection, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinosys.losses.distill import FeatureDistillLoss, normalize_tokens, token_distill_loss


def test_zero_when_student_equals_teacher_up_to_token_scale_and_shift() -> None:
    t = torch.randn(4, 8, 16)
    s = 3.0 * t + 0.5  # per-token affine change: the same after normalisation
    assert float(token_distill_loss(s, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(token_distill_loss(-t, t)) > 2.0  # opposite: cosine term 2 + smooth-L1 > 0


def test_matches_the_formula() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 12), torch.randn(5, 12)
    sn, tn = F.layer_norm(s, (12,)), F.layer_norm(t, (12,))
    want = (1 - F.cosine_similarity(sn, tn, dim=-1)).mean() * 0.5 + 2.0 * F.smooth_l1_loss(sn, tn)
    got = token_distill_loss(s, t, cosine_weight=0.5, smooth_l1_weight=2.0)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(normalize_tokens(s).mean(-1), torch.zeros(5), atol=1e-6, rtol=0)


def test_projection_when_widths_differ_and_gradients_flow() -> None:
    torch.manual_seed(0)
    loss_fn = FeatureDistillLoss(8, 16, cls_weight=1.0, patch_weight=0.5)
    assert isinstance(loss_fn.proj, torch.nn.Linear)
    s_cls = torch.randn(3, 8, requires_grad=True)
    s_patch = torch.randn(3, 4, 8, requires_grad=True)
    t_cls, t_patch = torch.randn(3, 16), torch.randn(3, 4, 16)
    out = loss_fn(s_cls, s_patch, t_cls, t_patch)
    torch.testing.assert_close(out.loss, out.cls + 0.5 * out.patch)
    out.loss.backward()
    assert s_cls.grad.abs().sum() > 0 and s_patch.grad.abs().sum() > 0
    assert loss_fn.proj.weight.grad.abs().sum() > 0
    # a few steps of training the projection alone bring the loss down
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        opt.zero_grad()
        value = loss_fn(s_cls.detach(), s_patch.detach(), t_cls, t_patch).loss
        value.backward()
        opt.step()
        first = first if first is not None else float(value.detach())
    assert float(value.detach()) < first
    assert list(FeatureDistillLoss(16, 16).parameters()) == []


def test_bad_input() -> None:
    loss_fn = FeatureDistillLoss(8, 8)
    with pytest.raises(ValueError, match="patch grids differ"):
        loss_fn(torch.randn(2, 8), torch.randn(2, 4, 8), torch.randn(2, 8), torch.randn(2, 9, 8))
    with pytest.raises(ValueError, match=">= 0"):
        FeatureDistillLoss(8, 8, cls_weight=-1)
    with pytest.raises(ValueError, match="positive"):
        FeatureDistillLoss(8, 8, cls_weight=0, patch_weight=0)
