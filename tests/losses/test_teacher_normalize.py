"""Centering and Sinkhorn-Knopp against direct, loop-based implementations of their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from dinosys.losses import Centering, sinkhorn_knopp


def reference_sinkhorn(t: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """docs/training.md's Sinkhorn-Knopp, element by element in Python floats."""
    n_samples, n_protos = t.shape
    q = [[math.exp(t[b, k].item() / temp) for b in range(n_samples)] for k in range(n_protos)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(n_iterations):
        for k in range(n_protos):
            row_sum = sum(q[k])
            q[k] = [v / row_sum / n_protos for v in q[k]]
        for b in range(n_samples):
            col_sum = sum(q[k][b] for k in range(n_protos))
            for k in range(n_protos):
                q[k][b] = q[k][b] / col_sum / n_samples
    return torch.tensor([[q[k][b] * n_samples for k in range(n_protos)] for b in range(n_samples)],
                        dtype=torch.float64)


@pytest.mark.parametrize("n_iterations", [1, 3])
def test_sinkhorn_matches_reference(n_iterations):
    torch.manual_seed(0)
    t = torch.randn(6, 5, dtype=torch.float64) * 0.5
    expected = reference_sinkhorn(t, 0.07, n_iterations)
    torch.testing.assert_close(sinkhorn_knopp(t, 0.07, n_iterations), expected,
                               rtol=1e-10, atol=1e-12)
    got32 = sinkhorn_knopp(t.float(), 0.07, n_iterations)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-7)


def test_sinkhorn_rows_are_probabilities_and_marginals_converge_to_uniform():
    torch.manual_seed(1)
    t = torch.randn(64, 16)
    q = sinkhorn_knopp(t, 0.1, n_iterations=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))  # per-sample probabilities
    assert (q >= 0).all()
    # Prototype marginals: each prototype gets B/K of the mass once the iterations converge.
    q = sinkhorn_knopp(t.double(), 0.3, n_iterations=100)
    torch.testing.assert_close(q.sum(dim=0), torch.full((16,), 64 / 16, dtype=torch.float64))


def test_sinkhorn_stays_finite_for_huge_logits():
    torch.manual_seed(2)
    # exp(t / 0.04) overflows fp32 here (the reference formula gives inf/inf = NaN); the
    # per-prototype shift makes it exact: same result as for the offset-free logits.
    t = 0.1 * torch.randn(32, 8)
    q = sinkhorn_knopp(t + 10.0, 0.04)
    assert torch.isinf(torch.exp((t + 10.0) / 0.04)).all()
    torch.testing.assert_close(q, sinkhorn_knopp(t, 0.04))
    torch.testing.assert_close(q.sum(dim=1), torch.ones(32))
    # Shift invariance in float64: a per-prototype constant does not change the result.
    small = torch.randn(10, 6, dtype=torch.float64)
    shifted = small + torch.randn(1, 6, dtype=torch.float64) * 30
    torch.testing.assert_close(sinkhorn_knopp(shifted, 0.05), sinkhorn_knopp(small, 0.05))
    # Beyond fp32's range (spreads of thousands of nats): finite, each sample's target sums
    # to 1, or is all-zero when its column underflows entirely (documented).
    q = sinkhorn_knopp(torch.randn(32, 8) * 200, 0.04)
    assert torch.isfinite(q).all()
    sums = q.sum(dim=1)
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0)) and (sums > 0).any()


def test_sinkhorn_padding_and_empty_input():
    torch.manual_seed(3)
    t = torch.randn(7, 9)
    padded = torch.cat([t, torch.full((3, 9), float("nan"))])
    q = sinkhorn_knopp(padded, 0.05, n_valid=7)
    torch.testing.assert_close(q[:7], sinkhorn_knopp(t, 0.05))
    assert torch.count_nonzero(q[7:]) == 0
    torch.testing.assert_close(sinkhorn_knopp(padded, 0.05, n_valid=torch.tensor(7))[:7], q[:7])
    assert sinkhorn_knopp(torch.zeros(0, 9), 0.05).shape == (0, 9)
    assert sinkhorn_knopp(padded, 0.05, n_valid=0).abs().sum() == 0


def test_sinkhorn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_knopp(torch.randn(3, 4), 0.0)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(torch.randn(3, 4), 0.1, n_iterations=0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn_knopp(torch.randn(3, 4, 5), 0.1)
    with pytest.raises(ValueError, match="n_valid"):
        sinkhorn_knopp(torch.randn(3, 4), 0.1, n_valid=4)


def test_centering_softmax_and_ema_update():
    torch.manual_seed(4)
    centering = Centering(5, momentum=0.9)
    expected_center = torch.zeros(1, 5)
    for step in range(3):
        t = torch.randn(4 + step, 5) * 3
        probs = centering.softmax_centered(t, 0.04)
        rows = [[math.exp((t[b, k] - expected_center[0, k]).item() / 0.04) for k in range(5)]
                for b in range(t.shape[0])]
        manual = torch.tensor([[v / sum(r) for v in r] for r in rows])
        torch.testing.assert_close(probs, manual)
        centering.update(t)
        mean = [sum(t[b, k].item() for b in range(t.shape[0])) / t.shape[0] for k in range(5)]
        expected_center = 0.9 * expected_center + 0.1 * torch.tensor([mean])
        torch.testing.assert_close(centering.center, expected_center)


def test_centering_patch_tokens_async_empty_and_state_dict():
    torch.manual_seed(5)
    centering = Centering(4, momentum=0.5)
    tokens = torch.randn(2, 3, 4, dtype=torch.bfloat16)  # (B, N, K) patch logits, low precision
    centering.update(tokens, async_op=True)  # no process group: applied at the next use
    expected = 0.5 * tokens.float().reshape(-1, 4).mean(0, keepdim=True)
    torch.testing.assert_close(centering.state_dict()["center"], expected)
    assert centering.softmax_centered(tokens, 0.1).dtype == torch.float32

    before = centering.center.clone()
    centering.update(torch.zeros(0, 4))  # no rows anywhere: center unchanged
    torch.testing.assert_close(centering.center, before)

    restored = Centering(4, momentum=0.5)
    restored.load_state_dict(centering.state_dict())
    torch.testing.assert_close(restored.center, before)
    with pytest.raises(ValueError, match="prototypes"):
        centering.update(torch.zeros(3, 5))
