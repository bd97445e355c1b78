"""Collate multi-crop samples into the SSL batch dict (crop-major order, iBOT masks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dinosys.data.masking import MaskGenerator


def _stack_crop_major(samples: Sequence[dict], key: str) -> torch.Tensor:
    n_crops = len(samples[0][key])
    if n_crops == 0:
        return torch.empty(0)
    ordered = [s[key][c] for c in range(n_crops) for s in samples]
    if isinstance(ordered[0], torch.Tensor):
        return torch.stack(ordered)
    return torch.from_numpy(np.stack(ordered))


def collate_ssl(samples: Sequence[dict[str, Any]], mask_gen: MaskGenerator | None,
                rng: np.random.Generator) -> dict[str, Any]:
    """Build the batch dict from B samples.

    Each sample: {"global_crops": [2 crops], "local_crops": [n_local crops], "label": int
    (optional)}; crops are normalised float32 (3,H,W) arrays or tensors (MultiCropAugmentation).
    Returns global_crops (2B,C,G,G) and local_crops (n_local*B,C,L,L) crop-major, masks (2B,N)
    bool, mask_indices (M,) long into the flattened (2B*N), mask_weights (M,) = 1/#masked in that
    image, n_masked M, batch_size B, labels (B,) long (-1 without classes).
    ``mask_gen=None`` masks nothing.
    """
    if not samples:
        raise ValueError("collate_ssl needs at least one sample")
    batch_size = len(samples)
    global_crops = _stack_crop_major(samples, "global_crops")
    local_crops = _stack_crop_major(samples, "local_crops")
    n_global = global_crops.shape[0]
    if mask_gen is not None:
        masks = torch.from_numpy(mask_gen.batch(n_global, rng))
    else:
        masks = torch.zeros((n_global, 0), dtype=torch.bool)  # no patch grid known: no tokens
    mask_indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1).clamp(min=1).to(torch.float32)
    mask_weights = (1.0 / per_image).unsqueeze(-1).expand_as(masks)[masks]
    labels = torch.tensor([int(s.get("label", -1)) for s in samples], dtype=torch.long)
    return {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": masks,
        "mask_indices": mask_indices,
        "mask_weights": mask_weights,
        "n_masked": int(mask_indices.numel()),
        "batch_size": batch_size,
        "labels": labels,
    }
