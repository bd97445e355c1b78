"""Image + caption batches for CLIP / SigLIP / LiT training (a :class:`BatchTransform`).

Per sample: the image, a RandomResizedCrop (``scale``/``ratio``; open_clip trains with scale
(0.9, 1.0)) resized to ``size`` px with torch's antialiased bicubic kernel, normalised; the
caption tokenised with the CLIP BPE to the text tower's context (a longer caption is cut with
end-of-text kept and counted in the batch's ``text_truncated``). A sample without a caption (no
``.txt`` member or sidecar) or with an empty one is a bad sample (``no_text``); a caption that
is not UTF-8 is ``bad_text``: the stream replaces it with another sample and counts it like an
unreadable image.

Batch: ``{"images": (B, 3, S, S), "tokens": (B, context) int64, "text_truncated": n,
"batch_size": B}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinosys.config import ConfigError, Section, check_range
from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.data.augment import random_resized_crop_box
from dinosys.data.decode import BadImageError, decode_array
from dinosys.data.sources import Sample
from dinosys.data.stream import BatchContext, BatchTransform
from dinosys.data.tokenizer import get_tokenizer


@dataclass
class ImageTextConfig(Section):
    """How the clip task turns (image, caption) samples into tensors."""

    size: int = 224  # crop size in pixels (the image tower's img_size)
    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop area
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # aspect ratio range
    # normalisation mean (RGB)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # normalisation std (RGB)
    max_pixels: int = 89_478_485  # larger images are refused as bad samples (decompression bombs)
    decoder: str = "auto"  # auto: simplejpeg for JPEGs when installed, else Pillow

    def validate(self) -> None:
        check_range(self.size, "image.size", 1)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"config key 'image.scale': need [low, high] with 0 < low <= "
                              f"high <= 1, got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"config key 'image.ratio': need [low, high] with 0 < low <= "
                              f"high, got {self.ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("config keys 'image.mean' / 'image.std': three values each, "
                              "std > 0")


@dataclass
class _Batch:
    images: torch.Tensor
    tokens: torch.Tensor
    truncated: torch.Tensor


class ImageTextBatches(BatchTransform):
    """One augmented view per image and its tokenised caption (picklable)."""

    def __init__(self, cfg: ImageTextConfig, context_length: int) -> None:
        self.cfg = cfg
        self.context_length = context_length
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def start(self, batch_size: int, ctx: BatchContext) -> _Batch:
        s = self.cfg.size
        state = _Batch(torch.empty(batch_size, 3, s, s),
                       torch.zeros(batch_size, self.context_length, dtype=torch.long),
                       torch.zeros(batch_size, dtype=torch.bool))
        if ctx.shared:
            for t in (state.images, state.tokens, state.truncated):
                t.share_memory_()
        return state

    def caption_ids(self, sample: Sample) -> tuple[list[int], bool]:
        """Token ids of the sample's caption; BadImageError when it has none usable."""
        if sample.text_error:
            raise BadImageError("bad_text", sample.text_error)
        text = sample.text
        if text is None or not text.strip():
            raise BadImageError("no_text", "no caption (.txt)")
        return get_tokenizer(self.context_length).row(text)

    def add(self, state: _Batch, slot: int, sample: Sample, rng: np.random.Generator) -> None:
        ids, cut = self.caption_ids(sample)  # before decoding: a caption-less image costs nothing
        pixels = decode_array(sample.image, self.cfg.max_pixels, decoder=self.cfg.decoder)
        h, w = pixels.shape[:2]
        left, top, cw, ch = random_resized_crop_box(w, h, tuple(self.cfg.scale), rng,
                                                    tuple(self.cfg.ratio))
        crop = torch.from_numpy(np.ascontiguousarray(pixels[top:top + ch, left:left + cw]))
        crop = crop.permute(2, 0, 1).unsqueeze(0)
        s = self.cfg.size
        if (ch, cw) != (s, s):
            crop = F.interpolate(crop, size=(s, s), mode="bicubic", antialias=True,
                                 align_corners=False).clamp_(0, 255).round_()
        img = crop[0].float().div_(255.0)
        state.images[slot] = (img - self.mean) / self.std
        state.tokens[slot].zero_()
        state.tokens[slot, : len(ids)] = torch.tensor(ids)
        state.truncated[slot] = cut

    def finish(self, state: _Batch, ctx: BatchContext) -> dict[str, Any]:
        return {"images": state.images, "tokens": state.tokens,
                "text_truncated": int(state.truncated.sum()),
                "batch_size": int(state.images.shape[0])}
