"""Collate multi-crop samples into the SSL batch dict (crop-major order, iBOT masks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dinosys.data.augment import CropConfig
from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.data.masking import MaskGenerator


def _stack_crop_major(samples: Sequence[dict], key: str, mean: Sequence[float],
                      std: Sequence[float]) -> torch.Tensor:
    n_crops = len(samples[0][key])
    if n_crops == 0:
        return torch.empty(0)
    ordered = [s[key][c] for c in range(n_crops) for s in samples]
    if isinstance(ordered[0], torch.Tensor):
        return torch.stack(ordered)
    stacked = torch.from_numpy(np.stack(ordered))
    if stacked.dtype == torch.uint8:  # raw HxWx3 crops: to normalised (N, 3, H, W) float
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        sd = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (stacked.permute(0, 3, 1, 2).float() - m) / sd
    return stacked


class CropBuffers:
    """Batch tensors that crops are rendered into directly, in crop-major order.

    ``views(i)`` gives sample ``i``'s destination arrays for ``MultiCropAugmentation.from_bytes(
    ..., out=...)``; with ``shared=True`` (DataLoader workers) the storage is allocated in shared
    memory so handing the batch to the main process copies nothing either. ``dtype=torch.uint8``
    holds the geometric-only crops of ``data.gpu_augment`` (``geometric_from_bytes``).
    """

    def __init__(self, batch_size: int, cfg: CropConfig, shared: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        self.batch_size = batch_size
        gs, ls = cfg.global_size, cfg.local_size
        self.global_crops = torch.empty((cfg.n_global * batch_size, 3, gs, gs), dtype=dtype)
        self.local_crops = torch.empty((cfg.n_local * batch_size, 3, ls, ls), dtype=dtype)
        if shared:
            self.global_crops.share_memory_()
            self.local_crops.share_memory_()
        self.n_global, self.n_local = cfg.n_global, cfg.n_local

    def views(self, i: int) -> dict[str, list[np.ndarray]]:
        """Writable numpy views of sample ``i``'s crop slots."""
        b, g, loc = self.batch_size, self.global_crops, self.local_crops
        return {"global_crops": [g[c * b + i].numpy() for c in range(self.n_global)],
                "local_crops": [loc[c * b + i].numpy() for c in range(self.n_local)]}


def assemble_ssl_batch(global_crops: torch.Tensor, local_crops: torch.Tensor,
                       labels: Sequence[int], mask_gen: MaskGenerator | None,
                       rng: np.random.Generator) -> dict[str, Any]:
    """The batch dict from crop-major stacked crops (see :func:`collate_ssl`) plus iBOT masks."""
    n_global = global_crops.shape[0]
    if mask_gen is not None:
        masks = torch.from_numpy(mask_gen.batch(n_global, rng))
    else:
        masks = torch.zeros((n_global, 0), dtype=torch.bool)  # no patch grid known: no tokens
    mask_indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1).clamp(min=1).to(torch.float32)
    mask_weights = (1.0 / per_image).unsqueeze(-1).expand_as(masks)[masks]
    return {
        "global_crops": global_crops,
        "local_crops": local_crops if local_crops.numel() else torch.empty(0),
        "masks": masks,
        "mask_indices": mask_indices,
        "mask_weights": mask_weights,
        "n_masked": int(mask_indices.numel()),
        "batch_size": len(labels),
        "labels": torch.tensor([int(v) for v in labels], dtype=torch.long),
    }


def collate_ssl(samples: Sequence[dict[str, Any]], mask_gen: MaskGenerator | None,
                rng: np.random.Generator, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> dict[str, Any]:
    """Build the batch dict from B samples.

    Each sample: {"global_crops": [2 crops], "local_crops": [n_local crops], "label": int
    (optional)}; crops are normalised float32 (3,H,W) arrays or tensors (MultiCropAugmentation),
    or uint8 (H,W,3) arrays normalised here with ``mean``/``std``.
    Returns global_crops (2B,C,G,G) and local_crops (n_local*B,C,L,L) crop-major, masks (2B,N)
    bool, mask_indices (M,) long into the flattened (2B*N), mask_weights (M,) = 1/#masked in that
    image, n_masked M, batch_size B, labels (B,) long (-1 without classes).
    ``mask_gen=None`` masks nothing.
    """
    if not samples:
        raise ValueError("collate_ssl needs at least one sample")
    global_crops = _stack_crop_major(samples, "global_crops", mean, std)
    local_crops = _stack_crop_major(samples, "local_crops", mean, std)
    labels = [int(s.get("label", -1)) for s in samples]
    return assemble_ssl_batch(global_crops, local_crops, labels, mask_gen, rng)
