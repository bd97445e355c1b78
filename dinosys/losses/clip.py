"""Symmetric InfoNCE (CLIP) with a learned logit scale, local loss over gathered features.

Each rank gathers every rank's (normalised) image and text features *with* gradient and
computes only its own rows: ``s * I_local T_global^T`` (B_local x B_global) for image->text and
``s * T_local I_global^T`` for text->image, s = exp(logit_scale). Per rank the loss is
``world * (sum of its rows' CE_img + CE_txt) / (2 * B_global)``; the average over ranks is the
full-matrix loss even with uneven per-rank batches, and with gradient averaging across ranks
(FSDP/DDP) the gradients are the full-matrix gradients (the gather's backward sums each row's
gradient onto the rank that owns it).

Equal captions: ``text_keys`` (one int64 per sample, equal for equal token rows; see
:func:`text_keys`) turn every pair with the same caption into a positive: each row's target is
uniform over its positives and the loss is KL(target || softmax) (cross-entropy minus the
target's entropy: 0 at the optimum, the same gradients), so label-derived captions that
repeat inside a batch are not pushed apart as false negatives. Without keys: diagonal targets.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from dinosys.losses._dist import ProcessGroup, gather_rows_with_grad, is_distributed

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # 2.6593
LOGIT_SCALE_MAX = math.log(100.0)  # 4.6052

_KEY_WEIGHTS = torch.randint(1, 2**62, (4096,), generator=torch.Generator().manual_seed(1234),
                             dtype=torch.long) | 1


def text_keys(tokens: Tensor) -> Tensor:
    """One int64 per row of token ids (B, L): equal rows give equal keys (padding ignored)."""
    if tokens.shape[1] > _KEY_WEIGHTS.numel():
        raise ValueError(f"text_keys supports up to {_KEY_WEIGHTS.numel()} tokens per row")
    w = _KEY_WEIGHTS[: tokens.shape[1]].to(tokens.device)
    return (tokens * w).sum(dim=1)  # int64 wrap-around arithmetic: a deterministic hash


def gather_keys(keys: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Every rank's keys in rank order (no gradient; uneven counts allowed)."""
    if not is_distributed(group):
        return keys
    world = dist.get_world_size(group)
    count = torch.tensor([keys.numel()], device=keys.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    padded = torch.zeros(max(sizes), dtype=keys.dtype, device=keys.device)
    padded[: keys.numel()] = keys
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32 unless it is already float32 or float64 (losses in full precision)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def positive_targets(row_keys: Tensor, col_keys: Tensor, dtype: torch.dtype) -> Tensor:
    """(R, C) soft targets: uniform over the columns whose key equals the row's."""
    pos = (row_keys[:, None] == col_keys[None, :]).to(dtype)
    return pos / pos.sum(dim=1, keepdim=True)


def _soft_ce_sum(logits: Tensor, targets: Tensor | None, offset: int) -> Tensor:
    """Sum over rows of KL(targets || softmax(logits)) (= cross-entropy for one-hot targets)."""
    logp = at_least_fp32(logits).log_softmax(dim=1)
    if targets is None:
        idx = torch.arange(logits.shape[0], device=logits.device) + offset
        return -logp.gather(1, idx[:, None]).sum()
    # only the positives count (elsewhere the target is 0 and the log-prob may be -inf)
    pos = targets > 0
    return (targets[pos] * (targets[pos].log() - logp[pos])).sum()


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
              keys: Tensor | None = None, group: ProcessGroup | None = None) -> Tensor:
    """This rank's share of the symmetric InfoNCE loss (see the module docstring).

    ``image_features``/``text_features``: (B_local, E), L2-normalised; ``logit_scale``: the
    learned log-scale (scalar); ``keys``: optional (B_local,) int64 caption keys.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                         f"{tuple(text_features.shape)} must have the same shape")
    img_all, offset = gather_rows_with_grad(image_features, group)
    txt_all, _ = gather_rows_with_grad(text_features, group)
    scale = logit_scale.exp()
    logits_img = scale * image_features @ txt_all.T
    logits_txt = scale * text_features @ img_all.T
    targets = None
    if keys is not None:
        targets = positive_targets(keys, gather_keys(keys, group), at_least_fp32(logits_img).dtype)
    total = _soft_ce_sum(logits_img, targets, offset) + _soft_ce_sum(logits_txt, targets, offset)
    world = dist.get_world_size(group) if is_distributed(group) else 1
    return total * world / (2 * img_all.shape[0])


def clamp_logit_scale_(logit_scale: Tensor, max_value: float = LOGIT_SCALE_MAX) -> None:
    """Clamp the learned log-scale to [0, ln 100] in place (after each optimizer step)."""
    with torch.no_grad():
        logit_scale.clamp_(0, max_value)
