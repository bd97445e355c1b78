"""KoLeo against a loop-based implementation, and its guards (B=1, duplicates, zeros)."""

from __future__ import annotations

import torch

from dinosys.losses import koleo_loss


def reference_koleo(x: torch.Tensor, eps: float = 1e-8, duplicate_tol: float | None = None):
    """-mean_i log(||x_i - x_nn(i)|| + eps), nn by max dot product over j != i, row by row.

    With `duplicate_tol`, rows within that distance of x_i are skipped and a row without any
    other row contributes 0 (the documented guard).
    """
    rows = [x[i] / torch.clamp(x[i].norm(), min=eps) for i in range(x.shape[0])]
    total = x.sum() * 0
    for i, xi in enumerate(rows):
        best, best_dot = None, -float("inf")
        for j, xj in enumerate(rows):
            if j == i:
                continue
            if duplicate_tol is not None and (xi - xj).norm() <= duplicate_tol:
                continue
            dot = torch.dot(xi, xj).item()
            if dot > best_dot:
                best, best_dot = j, dot
        if best is not None:
            total = total - torch.log((xi - rows[best]).norm() + eps)
    return total / x.shape[0]


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def test_koleo_matches_reference_with_grads():
    torch.manual_seed(0)
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    loss = koleo_loss(x)
    expected = reference_koleo(x)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_grad(loss, x), _grad(expected, x), rtol=1e-6, atol=1e-6)


def test_koleo_low_precision_input_is_computed_in_fp32():
    torch.manual_seed(1)
    x = torch.randn(16, 8, dtype=torch.bfloat16, requires_grad=True)
    loss = koleo_loss(x)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference_koleo(x.detach().float()), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad.float()).all()


def test_koleo_batch_of_one_is_a_connected_zero():
    x = torch.randn(1, 6, requires_grad=True)
    loss = koleo_loss(x)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_koleo_duplicates_are_skipped_not_exploded():
    torch.manual_seed(2)
    x = torch.randn(6, 4, dtype=torch.float64)
    x[3] = x[0]
    x[5] = 2.5 * x[1]  # same direction, so the same point on the sphere
    x.requires_grad_(True)
    loss = koleo_loss(x)
    expected = reference_koleo(x, duplicate_tol=1e-6)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    grad = _grad(loss, x)
    torch.testing.assert_close(grad, _grad(expected, x), rtol=1e-6, atol=1e-6)
    assert grad.abs().max() < 100  # the unguarded formula gives ~1e7 here
    unguarded = reference_koleo(x)
    assert unguarded > 5 and loss < 2  # -log(1e-8)/6 per duplicate row vs a normal value


def test_koleo_all_identical_and_zero_rows_are_finite():
    for x in (torch.ones(5, 3), torch.zeros(5, 3), torch.zeros(2, 3)):
        x.requires_grad_(True)
        loss = koleo_loss(x)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(x.grad).all()
    # A zero row among real ones: its nearest distinct row is at distance exactly 1.
    torch.manual_seed(3)
    x = torch.cat([torch.zeros(1, 4), torch.randn(4, 4)]).requires_grad_(True)
    loss = koleo_loss(x)
    torch.testing.assert_close(loss, reference_koleo(x))
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_koleo_near_but_distinct_rows_are_still_pushed_apart():
    # At initialisation CLS features differ by ~1e-5: KoLeo must act there, not skip them.
    torch.manual_seed(4)
    base = torch.randn(1, 16, dtype=torch.float64)
    x = (base + 1e-5 * torch.randn(8, 16, dtype=torch.float64)).requires_grad_(True)
    loss = koleo_loss(x)
    torch.testing.assert_close(loss, reference_koleo(x), rtol=1e-6, atol=1e-6)
    assert loss > 10


def test_koleo_rejects_bad_shapes():
    import pytest

    with pytest.raises(ValueError, match=r"\(B, D\)"):
        koleo_loss(torch.randn(2, 3, 4))
