"""Collectives used by the losses; each is a no-op when torch.distributed is not initialised."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup


def is_distributed(group: ProcessGroup | None = None) -> bool:
    """True when collectives over `group` (default: WORLD) are meaningful."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_(tensor: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM,
                group: ProcessGroup | None = None) -> Tensor:
    """In-place all-reduce of `tensor` (identity without a process group)."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather of equally shaped tensors whose backward sums every rank's gradient for a
    part onto the rank that owns it (torch's own ``torch.distributed.nn.functional.all_gather``
    does the same but is deprecated). The backward all-reduces the stacked gradients and keeps
    this rank's slice: reduce-scatter would move less data, but gloo has none."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, group=ctx.group)
        return stacked[ctx.rank], None


def all_gather_with_grad(x: Tensor, group: ProcessGroup | None = None) -> list[Tensor]:
    """Every rank's ``x`` (same shape on every rank) in rank order, differentiably: the gradient
    of a part flows back to the rank that owns it, summed over the ranks that used it."""
    if not is_distributed(group):
        return [x]
    return list(_AllGatherWithGrad.apply(x, group))


def gather_rows_with_grad(x: Tensor, group: ProcessGroup | None = None) -> tuple[Tensor, int]:
    """Concatenate every rank's rows of `x` (n_r, ...) in rank order, differentiably.

    Ranks may hold different numbers of rows (they are padded for the collective and trimmed).
    The backward pass sums each rank's gradient for a row onto the rank that owns it, so with
    gradient averaging across ranks (FSDP/DDP) a loss whose per-rank values average to the
    global loss gets exactly the single-process gradient. Returns (gathered, offset of this
    rank's first row).
    """
    if not is_distributed(group):
        return x, 0
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    padded = x
    if x.shape[0] < max(sizes):
        pad = x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, pad], dim=0)
    parts = all_gather_with_grad(padded, group)
    gathered = torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)
    return gathered, sum(sizes[:rank])
