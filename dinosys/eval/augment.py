"""Seeded train-time augmentation for linear probes: random-resized crop + horizontal flip.

Applied to preprocessed evaluation batches (the resized, centre-cropped images), so the crops
come from the centre crop rather than the whole original image. Each batch's randomness is a
function of (seed, epoch, batch index) only: a sharded multi-rank extraction draws the same
crops as a single process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults, as in DINOv2's linear eval
RATIO = (3 / 4, 4 / 3)


def _crop_box(h: int, w: int, g: torch.Generator, scale: tuple[float, float] = SCALE
              ) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop with area in ``scale`` and aspect in RATIO."""
    area = h * w
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(*scale, generator=g))
        log_ratio = torch.empty(1).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=g)
        aspect = math.exp(float(log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    return 0, 0, h, w  # the whole image, as torchvision falls back to (approximately)


def random_resized_crop_flip(batch: Tensor, seed: int, epoch: int, index: int,
                             scale: tuple[float, float] = SCALE, flip: bool = True) -> Tensor:
    """Each image of ``batch`` (B, C, H, W): a random crop (area fraction in ``scale``) resized
    back to H x W (bicubic), flipped with probability 0.5 when ``flip``; deterministic in
    (seed, epoch, index)."""
    g = torch.Generator().manual_seed(hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
    _, _, h, w = batch.shape
    out = torch.empty_like(batch)
    for i, img in enumerate(batch):
        top, left, ch, cw = _crop_box(h, w, g, scale)
        crop = img[None, :, top:top + ch, left:left + cw]
        resized = F.interpolate(crop, size=(h, w), mode="bicubic", align_corners=False)
        # drawn with or without ``flip``: the same seed gives the same crops either way
        if float(torch.rand(1, generator=g)) < 0.5 and flip:
            resized = resized.flip(-1)
        out[i] = resized[0]
    return out
