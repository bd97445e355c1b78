"""Analytic FLOPs of the backbone (matrix multiplies, 2 FLOPs per multiply-add).

Counted: patch embedding, qkv / output projections, attention scores and weighted sums, and the
FFN of every block. Not counted: norms, softmax, activations, residual adds (< 1% at ViT sizes).

Counted is what the model computes. In training, above a drop-path rate of 0.1 each block's
residual branches run on floor(B * (1 - rate)) samples of each group of B same-size crops
(efficient stochastic depth, dinosys.models.block), so those samples are counted, not B. The
backward is 2x the forward, except the patch embedding, whose input (the image) needs no
gradient: 1x. Activation-checkpointing recompute is not model work: :func:`backbone_train_flops`
adds it only when asked (hardware FLOPs, for utilisation rather than MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dinosys.models.backbone_config import BackboneConfig
from dinosys.models.layers import swiglu_hidden_dim


def _resolved(model_or_cfg: nn.Module | BackboneConfig) -> BackboneConfig:
    from dinosys.models.vit import resolve_config

    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    if not isinstance(cfg, BackboneConfig):
        raise TypeError("expected a backbone or a BackboneConfig, "
                        f"got {type(model_or_cfg).__name__}")
    return resolve_config(cfg)


@dataclass(frozen=True)
class ImageFlops:
    """Forward FLOPs of one image: the patch embedding, and each block's two branches."""

    patch_embed: float
    attn_branch: float  # qkv + attention + proj, one block
    ffn_branch: float  # the FFN, one block
    depth: int

    @property
    def total(self) -> float:
        """Every block on the full image (no stochastic depth)."""
        return self.patch_embed + self.depth * (self.attn_branch + self.ffn_branch)


def image_flops(model_or_cfg: nn.Module | BackboneConfig,
                img_size: int | tuple[int, int]) -> ImageFlops:
    """The per-image forward FLOPs of ``img_size`` (int or (H, W)), split by part."""
    cfg = _resolved(model_or_cfg)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    p, d = cfg.patch_size, cfg.embed_dim
    n_patches = (h // p) * (w // p)
    n = 1 + cfg.num_registers + n_patches
    patch_embed = 2.0 * n_patches * (cfg.in_chans * p * p) * d
    qkv_proj = 2.0 * n * d * (3 * d) + 2.0 * n * d * d
    attention = 2.0 * 2.0 * n * n * d  # q k^T and attn @ v over all heads
    if cfg.ffn == "swiglu":
        hidden = swiglu_hidden_dim(d)
        ffn = 2.0 * n * d * (2 * hidden) + 2.0 * n * hidden * d
    else:
        ffn = 2.0 * 2.0 * n * d * (4 * d)
    return ImageFlops(patch_embed, qkv_proj + attention, ffn, cfg.depth)


def backbone_forward_flops(model_or_cfg: nn.Module | BackboneConfig,
                           img_size: int | tuple[int, int]) -> float:
    """Forward FLOPs for ONE image of ``img_size`` (int or (H, W)), every block computed."""
    return image_flops(model_or_cfg, img_size).total


def drop_path_rates(cfg: BackboneConfig) -> list[float]:
    """Each block's stochastic-depth rate, as the backbone builds them."""
    cfg = _resolved(cfg)
    if cfg.drop_path_uniform:
        return [cfg.drop_path_rate] * cfg.depth
    return torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()


def branch_batch(batch: int, rate: float) -> int:
    """Samples a residual branch runs on in training (the rule of dinosys.models.block)."""
    from dinosys.models.block import EFFICIENT_DROP_PATH_ABOVE

    if rate <= EFFICIENT_DROP_PATH_ABOVE:
        return batch
    return max(int(batch * (1.0 - rate)), 1)


def group_train_forward_flops(model_or_cfg: nn.Module | BackboneConfig,
                              img_size: int | tuple[int, int], batch: int) -> float:
    """Training-mode forward FLOPs of one group of ``batch`` same-size crops (the model
    concatenates same-size crops into one group), with efficient stochastic depth counted."""
    cfg = _resolved(model_or_cfg)
    f = image_flops(cfg, img_size)
    blocks = sum(branch_batch(batch, r) for r in drop_path_rates(cfg))
    return batch * f.patch_embed + blocks * (f.attn_branch + f.ffn_branch)


def group_train_flops(model_or_cfg: nn.Module | BackboneConfig,
                      img_size: int | tuple[int, int], batch: int,
                      activation_checkpointing: bool = False) -> float:
    """Forward + backward FLOPs of one training group of ``batch`` crops (see module doc);
    ``activation_checkpointing`` adds the recomputed block forwards (hardware FLOPs)."""
    cfg = _resolved(model_or_cfg)
    fwd = group_train_forward_flops(cfg, img_size, batch)
    embed = batch * image_flops(cfg, img_size).patch_embed
    blocks = fwd - embed
    return 2.0 * embed + blocks * (4.0 if activation_checkpointing else 3.0)


def backbone_train_flops(model_or_cfg: nn.Module | BackboneConfig,
                         img_size: int | tuple[int, int],
                         activation_checkpointing: bool = False, batch: int = 1) -> float:
    """Forward + backward FLOPs per image, averaged over a group of ``batch`` crops.

    Without stochastic depth above 0.1 this does not depend on ``batch``.
    """
    return group_train_flops(model_or_cfg, img_size, batch, activation_checkpointing) / batch
