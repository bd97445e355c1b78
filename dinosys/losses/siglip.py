"""SigLIP pairwise sigmoid loss, distributed by neighbour exchange (no global matrix).

Loss over a global batch of B pairs: ``-(1/B) sum_ij log sigmoid(z_ij (s <x_i, y_j> + b))``,
z_ij = +1 for a positive pair, -1 otherwise; s = exp(logit_scale) (init ln 10), b a learned
bias (init -10). Across ranks, each rank scores its images against its own texts, then passes
the text block it holds to the next rank (receiving the previous rank's) world-1 times, so a
rank never holds more than two text blocks and no rank builds the B x B matrix. The exchange is
differentiable: its backward sends the gradient back the way the block came. Per rank the loss
is ``world * (its partial sum) / B_global``, so the rank average is the single-process loss and
gradient averaging across ranks gives the single-process gradients. Equal captions (equal
``keys``) are positives, on any rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dinosys.losses._dist import ProcessGroup, is_distributed
from dinosys.losses.clip import at_least_fp32

SIGLIP_SCALE_INIT = math.log(10.0)
SIGLIP_BIAS_INIT = -10.0


def _exchange(tensor: Tensor, send_to: int, recv_from: int, recv_rows: int,
              group: ProcessGroup | None) -> Tensor:
    out = tensor.new_empty((recv_rows, *tensor.shape[1:]))
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), dist.get_global_rank(group, send_to)
                      if group is not None else send_to, group),
           dist.P2POp(dist.irecv, out, dist.get_global_rank(group, recv_from)
                      if group is not None else recv_from, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _NeighbourExchange(torch.autograd.Function):
    """Send ``x`` to rank ``send_to``, receive ``recv_rows`` rows from ``recv_from``."""

    @staticmethod
    def forward(ctx, x: Tensor, send_to: int, recv_from: int, recv_rows: int,  # type: ignore[override]
                group: ProcessGroup | None) -> Tensor:
        ctx.route = (send_to, recv_from, x.shape[0], group)
        return _exchange(x, send_to, recv_from, recv_rows, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        send_to, recv_from, own_rows, group = ctx.route
        return _exchange(grad, recv_from, send_to, own_rows, group), None, None, None, None


def _pair_loss_sum(img: Tensor, txt: Tensor, scale: Tensor, bias: Tensor,
                   row_keys: Tensor | None, col_keys: Tensor | None, diagonal: bool) -> Tensor:
    logits = at_least_fp32(scale * img @ txt.T + bias)
    if row_keys is not None and col_keys is not None:
        pos = row_keys[:, None] == col_keys[None, :]
    elif diagonal:
        pos = torch.eye(img.shape[0], txt.shape[0], dtype=torch.bool, device=img.device)
    else:
        pos = torch.zeros(logits.shape, dtype=torch.bool, device=img.device)
    sign = pos.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(sign * logits).sum()


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor, keys: Tensor | None = None,
                group: ProcessGroup | None = None) -> Tensor:
    """This rank's share of the sigmoid loss (see the module docstring); features normalised."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                         f"{tuple(text_features.shape)} must have the same shape")
    scale = logit_scale.exp()
    total = _pair_loss_sum(image_features, text_features, scale, logit_bias, keys, keys, True)
    if not is_distributed(group):
        return total / image_features.shape[0]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    count = torch.tensor([image_features.shape[0]], device=image_features.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    right, left = (rank + 1) % world, (rank - 1) % world
    txt, held_keys = text_features, keys
    for step in range(1, world):
        rows = sizes[(rank - step) % world]
        txt = _NeighbourExchange.apply(txt, right, left, rows, group)
        if keys is not None:
            held_keys = _exchange(held_keys, right, left, rows, group)
        total = total + _pair_loss_sum(image_features, txt, scale, logit_bias, keys, held_keys,
                                       False)
    return total * world / sum(sizes)
