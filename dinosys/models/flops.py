"""Analytic FLOPs of the backbone (matrix multiplies, 2 FLOPs per multiply-add).

Counted: patch embedding, qkv / output projections, attention scores and weighted sums, and the
FFN of every block. Not counted: norms, softmax, activations, residual adds (< 1% at ViT sizes).
Training FLOPs are 3x the forward (backward = 2x forward), plus one more forward per block
when activation checkpointing recomputes it.
"""

from __future__ import annotations

from torch import nn

from dinosys.config import BackboneConfig
from dinosys.models.layers import swiglu_hidden_dim


def _resolved(model_or_cfg: nn.Module | BackboneConfig) -> BackboneConfig:
    from dinosys.models.vit import resolve_config

    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    if not isinstance(cfg, BackboneConfig):
        raise TypeError("expected a backbone or a BackboneConfig, "
                        f"got {type(model_or_cfg).__name__}")
    return resolve_config(cfg)


def backbone_forward_flops(model_or_cfg: nn.Module | BackboneConfig,
                           img_size: int | tuple[int, int]) -> float:
    """Forward FLOPs for ONE image of ``img_size`` (int or (H, W)) through the backbone."""
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
    return patch_embed + cfg.depth * (qkv_proj + attention + ffn)


def backbone_train_flops(model_or_cfg: nn.Module | BackboneConfig,
                         img_size: int | tuple[int, int],
                         activation_checkpointing: bool = False) -> float:
    """Forward + backward FLOPs for one image (backward = 2x forward; AC adds a forward)."""
    fwd = backbone_forward_flops(model_or_cfg, img_size)
    return fwd * (4.0 if activation_checkpointing else 3.0)
