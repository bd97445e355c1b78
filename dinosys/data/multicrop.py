"""The SSL batch transform: DINOv2 multi-crop + iBOT masks over the generic sample stream.

Per sample: 2 global + ``n_local`` local crops rendered straight into the batch tensors
(:class:`~dinosys.data.collate.CropBuffers`), from the sample's own generator; per batch: iBOT
masks from ``default_rng([seed, epoch, tag, first position])``. With ``data.gpu_augment``
workers only decode, crop and flip; batches carry uint8 crops and the crops' photometric
parameters under ``batch["photometric"]`` (same random draws), which
:func:`dinosys.data.gpu_augment.apply_photometric` turns into the usual normalised crops on the
training device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dinosys.data.augment import CropConfig, MultiCropAugmentation
from dinosys.data.collate import CropBuffers, assemble_ssl_batch
from dinosys.data.gpu_augment import PARAMS_KEY, PhotometricParams
from dinosys.data.masking import MaskConfig, MaskGenerator
from dinosys.data.sources import Sample
from dinosys.data.stream import BatchContext, BatchTransform, DataConfig, SampleLoader
from dinosys.errors import UserError

logger = logging.getLogger(__name__)

_STREAM_MASK = 22


@dataclass
class _MultiCropBatch:
    buffers: CropBuffers
    labels: list[int]
    photometric: PhotometricParams | None


class MultiCropBatches(BatchTransform):
    """Samples -> ``{"global_crops", "local_crops", "masks", "mask_indices", "mask_weights",
    "labels", "batch_size", ...}`` (see :func:`dinosys.data.collate.assemble_ssl_batch`)."""

    def __init__(self, crops: CropConfig, masking: MaskConfig, data: DataConfig,
                 patch_size: int) -> None:
        if crops.global_size % patch_size:
            raise UserError(f"crops.global_size {crops.global_size} is not a multiple of the "
                            f"patch size {patch_size}")
        self.crops, self.data = crops, data
        self.augment = MultiCropAugmentation(crops)
        self.mask_gen = MaskGenerator(crops.global_size // patch_size, masking)

    def start(self, batch_size: int, ctx: BatchContext) -> _MultiCropBatch:
        gpu = self.data.gpu_augment  # uint8 crops + photometric parameters
        buffers = CropBuffers(batch_size, self.crops, shared=ctx.shared,
                              dtype=torch.uint8 if gpu else torch.float32)
        photometric = PhotometricParams(batch_size, self.crops) if gpu else None
        return _MultiCropBatch(buffers, [-1] * batch_size, photometric)

    def add(self, state: _MultiCropBatch, slot: int, sample: Sample,
            rng: np.random.Generator) -> None:
        data, out = self.data, state.buffers.views(slot)
        if state.photometric is not None:
            _, params = self.augment.geometric_from_bytes(sample.image, rng, data.max_image_pixels,
                                                          data.decoder, out=out)
            state.photometric.set_sample(slot, params)
        else:
            self.augment.from_bytes(sample.image, rng, data.max_image_pixels, data.decoder,
                                    out=out)
        state.labels[slot] = sample.label

    def finish(self, state: _MultiCropBatch, ctx: BatchContext) -> dict[str, Any]:
        mask_rng = np.random.default_rng([ctx.seed, ctx.epoch, _STREAM_MASK, ctx.first])
        batch = assemble_ssl_batch(state.buffers.global_crops, state.buffers.local_crops,
                                   state.labels, self.mask_gen, mask_rng)
        if state.photometric is not None:
            batch[PARAMS_KEY] = state.photometric.as_dict()
        return batch


def build_ssl_loader(cfg: Any, rank: int, world_size: int, patch_size: int) -> SampleLoader:
    """The SSL training loader of ``rank`` out of ``world_size`` for an SSL run config
    (``data``, ``crops``, ``masking``, ``seed``)."""
    transform = MultiCropBatches(cfg.crops, cfg.masking, cfg.data, patch_size)
    if cfg.data.gpu_augment and not torch.cuda.is_available():
        logger.warning("data.gpu_augment is on without CUDA: the photometric ops run as torch "
                       "ops on the CPU, slower than the default CPU path")
    return SampleLoader(cfg.data, cfg.seed, rank, world_size, transform)
