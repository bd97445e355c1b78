"""The losses on CUDA under bf16 autocast agree with the CPU fp32 path (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from dinosys.losses import Centering, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from dinosys.models.heads import DINOHead

pytestmark = pytest.mark.gpu


def test_losses_on_cuda_match_cpu():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    batch, n_local, dim, k = 16, 4, 96, 2048
    head = DINOHead(dim, k, hidden_dim=256, bottleneck_dim=64).to(dev)
    feats = torch.randn((2 + n_local) * batch, dim, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = head(feats)
    assert logits.dtype == torch.bfloat16
    student_global, student_local = logits[: 2 * batch], logits[2 * batch:]
    teacher_logits = head(torch.randn(2 * batch, dim, device=dev)).detach()

    probs = sinkhorn_knopp(teacher_logits, 0.04)
    torch.testing.assert_close(probs.cpu(), sinkhorn_knopp(teacher_logits.cpu(), 0.04),
                               atol=1e-6, rtol=1e-4)
    centering = Centering(k).to(dev)
    centered = centering.softmax_centered(teacher_logits, 0.04)
    centering.update(teacher_logits)
    torch.testing.assert_close(centering.center.cpu(), 0.1 * teacher_logits.mean(0, True).cpu())

    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = dino_loss(student_global, centered, student_local)
        cls = feats[: 2 * batch].clone()
        cls[5] = cls[0]  # a duplicate
        koleo = koleo_loss(cls)
        masked = ibot_loss(student_global[:10], probs[:10], torch.full((10,), 0.5, device=dev),
                           2 * batch)
    cpu = dino_loss(student_global.float().cpu(), centered.cpu(), student_local.float().cpu())
    torch.testing.assert_close(out.loss.cpu(), cpu.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(koleo.cpu(), koleo_loss(cls.cpu()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        masked.cpu(),
        ibot_loss(student_global[:10].float().cpu(), probs[:10].cpu(), torch.full((10,), 0.5),
                  2 * batch),
        rtol=1e-5, atol=1e-5,
    )
    (out.loss + masked + 0.1 * koleo).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
