"""DINO and iBOT losses against loop-based implementations of their formulas (float64 grads)."""

from __future__ import annotations

import pytest
import torch

from dinosys.losses import dino_loss, dino_loss_from_crops, ibot_loss, sinkhorn_knopp
from dinosys.losses.soft_ce import soft_cross_entropy

TEMP = 0.1


def cross_entropy_row(p: torch.Tensor, z: torch.Tensor, temp: float) -> torch.Tensor:
    """-sum_k p_k log softmax(z / temp)_k for one row, written out."""
    scaled = z / temp
    log_norm = torch.log(torch.exp(scaled - scaled.max()).sum()) + scaled.max()
    return -sum(p[k] * (scaled[k] - log_norm) for k in range(p.shape[0]))


def reference_dino(student_crops, teacher_crops, temp):
    """Sum over (teacher global t, student crop s != t) of the batch-mean CE, / n_pairs."""
    total, n_pairs = 0.0, 0
    for t, p in enumerate(teacher_crops):
        for s, z in enumerate(student_crops):
            if s == t:
                continue
            batch = p.shape[0]
            total = total + sum(cross_entropy_row(p[b], z[b], temp) for b in range(batch)) / batch
            n_pairs += 1
    return total / n_pairs


def _crops(n_global, n_local, batch=3, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(batch, k, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(n_global + n_local)]
    teacher = [torch.softmax(torch.randn(batch, k, generator=g, dtype=torch.float64) / 0.5, -1)
               for _ in range(n_global)]
    return student, teacher


@pytest.mark.parametrize("n_global,n_local", [(2, 3), (2, 0), (1, 2), (3, 1)])
def test_dino_loss_and_grads_match_reference(n_global, n_local):
    student, teacher = _crops(n_global, n_local)
    out = dino_loss_from_crops(student, teacher, student_temp=TEMP)
    expected = reference_dino(student, teacher, TEMP)
    assert out.n_pairs == n_global * (n_global + n_local) - n_global
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(out.loss, student)
    # With one global crop the student's global view is in no pair: its gradient is zero.
    expected_grads = torch.autograd.grad(expected, student, allow_unused=True)
    for got, want in zip(grads, expected_grads):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_dino_logging_terms_split_global_and_local_pairs():
    student, teacher = _crops(2, 4)
    out = dino_loss_from_crops(student, teacher, TEMP)
    torch.testing.assert_close(out.global_loss, reference_dino(student[:2], teacher, TEMP).detach())
    local = sum(
        cross_entropy_row(teacher[t][b], student[s][b], TEMP) / 3
        for t in range(2) for s in range(2, 6) for b in range(3)
    ) / 8
    torch.testing.assert_close(out.local_loss, local.detach())
    torch.testing.assert_close(out.loss.detach(), (2 * out.global_loss + 8 * out.local_loss) / 10)
    assert not out.global_loss.requires_grad and out.loss.requires_grad


def test_dino_stacked_api_accepts_low_precision_and_sinkhorn_targets():
    torch.manual_seed(0)
    batch, k = 4, 32
    student_global = torch.randn(2 * batch, k, dtype=torch.bfloat16, requires_grad=True)
    student_local = torch.randn(3 * batch, k, dtype=torch.bfloat16, requires_grad=True)
    teacher = sinkhorn_knopp(torch.randn(2 * batch, k), 0.05).t().contiguous().t()
    assert not teacher.is_contiguous()  # strided targets are fine
    out = dino_loss(student_global, teacher, student_local)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    ref = dino_loss(student_global.float(), teacher.contiguous(), student_local.float())
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert student_global.grad.dtype == torch.bfloat16 and torch.isfinite(student_local.grad).all()


def test_dino_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="split"):
        dino_loss(torch.randn(5, 4), torch.rand(5, 4))
    with pytest.raises(ValueError, match="multiple"):
        dino_loss(torch.randn(4, 4), torch.rand(4, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="at least one local"):
        dino_loss(torch.randn(4, 4), torch.rand(4, 4), n_global_crops=1)


def _masked_batch(n_images=4, n_patches=9, k=5, seed=0):
    """Masks, flat indices and 1/n_masked weights laid out as the data loader's batch."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_images, n_patches, generator=g) < 0.4
    masks[1] = False  # an unmasked image
    masks[2, :] = True  # a fully masked one
    indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(dim=1).clamp_min(1).double()
    weights = (1.0 / per_image)[indices // n_patches]
    m = indices.numel()
    student = torch.randn(m, k, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.softmax(torch.randn(m, k, generator=g, dtype=torch.float64), -1)
    return masks, indices, weights, student, teacher


def test_ibot_loss_and_grads_match_reference():
    masks, indices, weights, student, teacher = _masked_batch()
    n_images = masks.shape[0]
    loss = ibot_loss(student, teacher, weights, n_images, TEMP)
    expected = sum(weights[i] * cross_entropy_row(teacher[i], student[i], TEMP)
                   for i in range(indices.numel())) / n_images
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    (got,) = torch.autograd.grad(loss, student)
    (want,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # Same thing read per image: each masked image's mean token CE, summed, / #images.
    image_of = indices // masks.shape[1]
    per_image = [
        torch.stack([cross_entropy_row(teacher[i], student[i], TEMP)
                     for i in range(indices.numel()) if image_of[i] == img]).mean()
        for img in range(n_images) if masks[img].any()
    ]
    torch.testing.assert_close(loss, sum(per_image) / n_images)


def test_ibot_without_masked_tokens_is_a_connected_zero():
    student = torch.zeros(0, 7, requires_grad=True)
    loss = ibot_loss(student, torch.zeros(0, 7), torch.zeros(0), n_global_images=8)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert student.grad is not None and student.grad.shape == (0, 7)


def test_ibot_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_global_images"):
        ibot_loss(torch.randn(2, 3), torch.rand(2, 3), torch.ones(2), 0)
    with pytest.raises(ValueError, match="mask_weights"):
        ibot_loss(torch.randn(2, 3), torch.rand(2, 3), torch.ones(3), 4)


def test_soft_cross_entropy_gradcheck_with_broadcast_unnormalised_targets():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(4, 6, generator=g, dtype=torch.float64) * 2  # (B, K) for 3 crops
    assert torch.autograd.gradcheck(lambda z: soft_cross_entropy(z, targets, 0.1), (logits,))
    expected = -(targets * torch.log_softmax(logits / 0.1, dim=-1)).sum(-1)
    torch.testing.assert_close(soft_cross_entropy(logits, targets, 0.1), expected)
    low = logits.detach().to(torch.bfloat16).requires_grad_(True)
    out = soft_cross_entropy(low, targets.float(), 0.1)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()
