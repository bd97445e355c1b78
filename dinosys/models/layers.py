"""Building blocks of the DINOv2 vision transformer: patch embedding, FFNs, LayerScale.

Module and parameter names follow the released DINOv2 hub layout (``patch_embed.proj``,
``mlp.fc1``/``mlp.fc2`` or ``mlp.w12``/``mlp.w3``, ``ls1.gamma``) so that state dicts load
into timm and convert to Hugging Face without renaming tricks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, D) with a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Linear - GELU - Linear feed-forward network (ViT-S/B/L)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(dim: int, ratio: float = 4.0) -> int:
    """DINOv2's SwiGLU width: 2/3 of the MLP width rounded up to a multiple of 8 (1536 -> 4096)."""
    return (int(int(dim * ratio) * 2 / 3) + 7) // 8 * 8


class SwiGLUFFNFused(nn.Module):
    """SwiGLU FFN with the gate and value projections fused in one matrix ``w12`` (ViT-g)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (init 1e-5 in DINOv2)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def reset_parameters(self) -> None:
        """Refill gamma with its init value (used after meta-device construction)."""
        with torch.no_grad():
            self.gamma.fill_(self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path_per_sample(x: Tensor, rate: float) -> Tensor:
    """Zero whole samples of a residual branch with probability ``rate``, rescale the rest."""
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep
