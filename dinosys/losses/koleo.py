"""KoLeo regulariser (Sablayrolles et al. 2019), guarded against batch size 1 and duplicates.

loss = -mean_i log(||x_i - x_nn(i)|| + eps) on L2-normalised fp32 rows, nn(i) the nearest
other row. The reference implementation is infinite-or-huge in two cases users hit:

- batch size 1: there is no other row. The row contributes 0 (graph kept, zero gradient).
- exact duplicates (two copies of one image, identical or all-zero features): their distance
  is 0 and the loss -log(1e-8) = 18.4 comes with a ~1e8 gradient spike. Rows closer than
  `duplicate_tol` (on the unit sphere, measured exactly, not through the Gram matrix whose
  fp32 cancellation cannot resolve distances below ~1e-3) are not neighbours: a duplicate
  is the same sample, and KoLeo should spread distinct samples. Each row's neighbour is
  the nearest row farther than `duplicate_tol`; a row with none (everything else is a copy
  of it) contributes 0. The default tolerance is at fp32 rounding level, so genuinely
  close but distinct features (e.g. at initialisation) are still pushed apart.

Rows without a neighbour still count in the mean's denominator (a fixed normaliser).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dinosys.losses._dist import ProcessGroup, gather_rows_with_grad, is_distributed
from dinosys.losses._precision import at_least_fp32


def koleo_loss(
    x: Tensor,
    eps: float = 1e-8,
    duplicate_tol: float = 1e-6,
    distributed: bool = False,
    group: ProcessGroup | None = None,
) -> Tensor:
    """KoLeo loss of the (B, D) features `x`; never inf/NaN, gradients finite.

    With `distributed=True` (and torch.distributed initialised) neighbours are searched in the
    batch gathered from all ranks; each rank returns its rows' share, scaled so that the mean
    of the per-rank losses is the global-batch loss and rank-averaged gradients equal the
    single-process gradients. Every rank must then call this and backpropagate through it
    (the gather's backward is a collective).
    """
    if x.dim() != 2:
        raise ValueError(f"koleo_loss expects (B, D) features, got {tuple(x.shape)}")
    if duplicate_tol < 0:
        raise ValueError(f"duplicate_tol must be >= 0, got {duplicate_tol}")
    with torch.autocast(x.device.type, enabled=False):
        feats = F.normalize(at_least_fp32(x), dim=-1, p=2, eps=eps)
        use_dist = distributed and is_distributed(group)
        if use_dist:
            candidates, offset = gather_rows_with_grad(feats, group)
        else:
            candidates, offset = feats, 0
        n_rows = feats.shape[0]
        nn_idx, has_neighbour = _nearest_distinct(feats, candidates, offset, duplicate_tol)
        diff = feats - candidates[nn_idx]
        # Rows without a neighbour get a constant stand-in so no 0/0 reaches the backward.
        diff = torch.where(has_neighbour.unsqueeze(1), diff, torch.ones_like(diff))
        dists = torch.linalg.vector_norm(diff, dim=-1)
        terms = torch.where(has_neighbour, -torch.log(dists + eps), torch.zeros_like(dists))
        if use_dist:
            scale = dist.get_world_size(group) / max(candidates.shape[0], 1)
        else:
            scale = 1.0 / max(n_rows, 1)
        return terms.sum() * scale


@torch.no_grad()
def _nearest_distinct(
    feats: Tensor, candidates: Tensor, offset: int, duplicate_tol: float
) -> tuple[Tensor, Tensor]:
    """Index (into candidates) of each row's nearest candidate farther than duplicate_tol,
    and whether there is one."""
    n_rows = feats.shape[0]
    if n_rows == 0 or candidates.shape[0] == 0:
        empty = torch.zeros(n_rows, dtype=torch.long, device=feats.device)
        return empty, torch.zeros(n_rows, dtype=torch.bool, device=feats.device)
    # Nearest = largest dot product (the reference's criterion; for unit rows the same as
    # smallest distance, and zero rows stay at distance 1 from everything). Duplicates are
    # found with exact pairwise distances: 2 - 2 dot cancels to fp32 noise below ~1e-3.
    dots = feats @ candidates.T
    exact = torch.cdist(feats, candidates, compute_mode="donot_use_mm_for_euclid_dist")
    rows = torch.arange(n_rows, device=feats.device)
    dots[rows, rows + offset] = float("-inf")
    dots.masked_fill_(exact <= duplicate_tol, float("-inf"))
    best, nn_idx = dots.max(dim=1)
    return nn_idx, torch.isfinite(best)
