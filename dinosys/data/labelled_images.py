"""A plain batch transform: each sample's image resized and centre-cropped, plus its label.

``{"images": (B, 3, S, S) normalised, "labels": (B,) int64, "batch_size": B}``. Used by the
toy task (docs/tasks.md) and any task that needs one view per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.data.decode import decode_image
from dinosys.data.sources import Sample
from dinosys.data.stream import BatchContext, BatchTransform


@dataclass
class _Batch:
    images: torch.Tensor
    labels: torch.Tensor


class LabelledImageBatches(BatchTransform):
    """Resize the shorter side to ``size`` (bicubic), centre-crop, normalise; keep the label."""

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, max_pixels: int = 89_478_485,
                 decoder: str = "auto") -> None:
        self.size, self.max_pixels, self.decoder = size, max_pixels, decoder
        self.mean, self.std = list(mean), list(std)

    def start(self, batch_size: int, ctx: BatchContext) -> _Batch:
        images = torch.empty(batch_size, 3, self.size, self.size)
        labels = torch.full((batch_size,), -1, dtype=torch.int64)
        if ctx.shared:
            images.share_memory_()
            labels.share_memory_()
        return _Batch(images, labels)

    def add(self, state: _Batch, slot: int, sample: Sample, rng: np.random.Generator) -> None:
        from dinosys.eval.images import preprocess

        img = decode_image(sample.image, self.max_pixels, draft_size=(self.size, self.size),
                           decoder=self.decoder)
        state.images[slot] = preprocess(img, self.size, self.mean, self.std)
        state.labels[slot] = sample.label

    def finish(self, state: _Batch, ctx: BatchContext) -> dict[str, Any]:
        return {"images": state.images, "labels": state.labels,
                "batch_size": int(state.images.shape[0])}
