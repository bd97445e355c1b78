"""Teacher-output normalisation: EMA centering and Sinkhorn-Knopp, correct across ranks.

Both work on fp32 copies of the teacher logits, under `torch.no_grad()`, and use
torch.distributed only when it is initialised (statistics are then those of the global batch:
sums and counts are all-reduced, so ranks may hold different numbers of rows).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinosys.losses._dist import ProcessGroup, all_reduce_, is_distributed
from dinosys.losses._precision import at_least_fp32


def _check_temp(temp: float) -> None:
    if not temp > 0:
        raise ValueError(f"teacher temperature must be > 0, got {temp}")


class Centering(nn.Module):
    """DINO teacher centering: probs = softmax((t - c) / temp), c <- m c + (1 - m) mean(t).

    `center` is a (1, K) fp32 buffer (saved in the state dict). `update` uses the mean over
    the global batch (local sum and row count all-reduced). With `async_op=True` the
    all-reduce is launched and the new center is applied lazily, at the next
    `softmax_centered`, `flush` or state-dict save/load (DINOv2's overlap trick: the center
    used at step s is the one updated with step s-1's statistics either way).
    """

    center: Tensor

    def __init__(self, n_prototypes: int, momentum: float = 0.9,
                 group: ProcessGroup | None = None) -> None:
        super().__init__()
        if n_prototypes < 1:
            raise ValueError(f"n_prototypes must be >= 1, got {n_prototypes}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"center momentum must be in [0, 1], got {momentum}")
        self.n_prototypes = n_prototypes
        self.momentum = momentum
        self.group = group
        self.register_buffer("center", torch.zeros(1, n_prototypes))
        self._pending: tuple[Tensor, Any] | None = None
        self.register_state_dict_pre_hook(lambda module, *_: module.flush())
        self.register_load_state_dict_pre_hook(lambda module, *_: module.flush())

    @torch.no_grad()
    def softmax_centered(self, teacher_logits: Tensor, temp: float) -> Tensor:
        """fp32 softmax((teacher_logits - center) / temp) over the last dim (..., K)."""
        _check_temp(temp)
        self.flush()
        return torch.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, async_op: bool = False) -> None:
        """EMA-update the center with the global-batch mean of `teacher_logits` (..., K)."""
        if teacher_logits.shape[-1] != self.n_prototypes:
            raise ValueError(
                f"teacher logits have {teacher_logits.shape[-1]} prototypes, "
                f"center has {self.n_prototypes}"
            )
        self.flush()
        rows = teacher_logits.detach().float().reshape(-1, self.n_prototypes)
        stats = torch.cat([rows.sum(dim=0), rows.new_full((1,), rows.shape[0])])
        work = None
        if is_distributed(self.group):
            work = dist.all_reduce(stats, group=self.group, async_op=async_op)
        self._pending = (stats, work if async_op else None)
        if not async_op:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Apply a pending (possibly in-flight) center update; no-op if there is none."""
        if self._pending is None:
            return
        stats, work = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        total, count = stats[:-1], stats[-1]
        updated = self.center * self.momentum + total / count.clamp_min(1) * (1 - self.momentum)
        # A global batch with no rows (e.g. no masked tokens anywhere) leaves the center as is.
        self.center.copy_(torch.where(count > 0, updated, self.center))


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    temp: float,
    n_iterations: int = 3,
    n_valid: int | Tensor | None = None,
    group: ProcessGroup | None = None,
) -> Tensor:
    """Sinkhorn-Knopp teacher targets (B, K) -> (B, K) probabilities (rows sum to 1).

    Computed in fp32 (float64 input stays float64), without gradient.

    Q = exp(t / temp)^T (K x B_global), Q /= sum(Q), then `n_iterations` of
    [rows /= rowsum, /= K; cols /= colsum, /= B_global], finally Q *= B_global and return Q^T.
    Row sums, the total and B_global (the count of rows) are all-reduced, so the result equals
    the single-process result on the concatenated global batch; ranks may hold different row
    counts (the iBOT masked-token case).

    `n_valid`: number of real rows on this rank when `teacher_logits` is padded to a fixed
    size; rows past it get zero mass and are returned as zeros (None: all rows are real).

    Numerics (no change to the result in exact arithmetic): each prototype's logits are
    shifted by their global-batch max before exp(); the first row normalisation cancels any
    per-prototype factor, and the shift keeps exp() finite for any logit range. A column or
    row whose entries all underflow to 0 stays 0 instead of becoming NaN.
    """
    _check_temp(temp)
    if n_iterations < 1:
        raise ValueError(f"sinkhorn n_iterations must be >= 1, got {n_iterations}")
    if teacher_logits.dim() != 2:
        raise ValueError(f"sinkhorn_knopp expects (B, K) logits, got {tuple(teacher_logits.shape)}")
    logits = at_least_fp32(teacher_logits.detach())
    n_rows, n_prototypes = logits.shape
    if n_valid is None:
        count = logits.new_full((1,), n_rows)
    else:
        if not isinstance(n_valid, Tensor) and not 0 <= n_valid <= n_rows:
            raise ValueError(f"n_valid must be in [0, {n_rows}], got {n_valid}")
        count = torch.as_tensor(n_valid, device=logits.device, dtype=logits.dtype).reshape(1)
        is_padding = torch.arange(n_rows, device=logits.device) >= count
        logits = logits.masked_fill(is_padding.unsqueeze(1), float("-inf"))

    if n_rows > 0:
        proto_max = logits.amax(dim=0)
    else:
        proto_max = logits.new_full((n_prototypes,), float("-inf"))
    all_reduce_(proto_max, op=dist.ReduceOp.MAX, group=group)
    proto_max = torch.where(torch.isfinite(proto_max), proto_max, torch.zeros_like(proto_max))

    # Q^T is kept as a (B, K) matrix: "rows" of Q (prototypes) are its columns here.
    q = torch.sub(logits, proto_max).div_(temp).exp_()
    total_and_count = torch.cat([q.sum().reshape(1), count])
    all_reduce_(total_and_count, group=group)
    total, b_global = total_and_count[0], total_and_count[1].clamp_min(1)
    tiny = torch.finfo(q.dtype).tiny
    q /= total.clamp_min(tiny)
    for _ in range(n_iterations):
        proto_sums = q.sum(dim=0)
        all_reduce_(proto_sums, group=group)
        q /= proto_sums.clamp_min(tiny) * n_prototypes
        q /= q.sum(dim=1, keepdim=True).clamp_min(tiny) * b_global
    q *= b_global
    return q
