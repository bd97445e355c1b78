"""Collectives used by the losses; each is a no-op when torch.distributed is not initialised."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
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
    parts = dist_fn.all_gather(padded, group=group)
    gathered = torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)
    return gathered, sum(sizes[:rank])
