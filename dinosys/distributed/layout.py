"""One device: train without FSDP2 and without activation checkpointing when memory allows.

On one rank FSDP2 shards nothing (it only adds per-block all-gather bookkeeping: +24% step time
on ViT-L on CPU) and activation checkpointing recomputes every block forward (+1/3 of the
FLOPs). :func:`choose_single_device_layout` turns both off when an estimate of the step's peak
memory fits 85% of the device, and says why either way.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from dinosys.distributed.env import DistEnv

if TYPE_CHECKING:
    from dinosys.train.tasks.ssl import SSLConfig

log = logging.getLogger(__name__)

GIB = 2**30
# bytes kept for backward per token per block, in units of embed_dim, under bf16 autocast: fp32
# norm inputs, bf16 norm outputs, q/k/v, attention and branch outputs, the FFN's hidden
# activations (a 4x MLP or DINOv2's SwiGLU width); fitted to ViT-L/14 at batch 32 on an H100
# (34.9 GiB measured peak, benchmarks/results/2026-11-23_h100.md)
SAVED_BYTES_PER_TOKEN_DIM = 34.0
HEAD_LOGIT_COPIES = 3  # fp32 logits, probabilities and gradients per head row
HEADROOM = 0.85  # of the device's total memory: allocator fragmentation, workspaces, cuDNN


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one device trains, and why."""

    fsdp: bool
    activation_checkpointing: bool
    reason: str
    estimate_gib: float | None = None


def _param_count(cfg: SSLConfig) -> tuple[int, int]:
    """(backbone, heads) trainable parameter counts, built on the meta device."""
    from dinosys.models import backbone_from_config
    from dinosys.models.heads import build_heads

    with torch.device("meta"):
        backbone = backbone_from_config(cfg.model)
        dino, ibot = build_heads(cfg.heads, backbone.embed_dim)
    heads = {id(m): m for m in (dino, ibot)}.values()
    return (sum(p.numel() for p in backbone.parameters()),
            sum(p.numel() for m in heads for p in m.parameters()))


def estimate_step_memory_gib(cfg: SSLConfig, activation_checkpointing: bool) -> float:
    """Estimated peak device memory of one single-device training step, in GiB."""
    from dinosys.models import resolve_config
    from dinosys.models.flops import branch_batch, drop_path_rates

    model = resolve_config(cfg.model)
    n_backbone, n_heads = _param_count(cfg)
    n_params = n_backbone + n_heads
    # student fp32 weights + grads + two AdamW moments, teacher fp32 weights
    state = n_params * (4 + 4 + 8) + n_params * 4
    b, p, d = cfg.data.batch_size_per_gpu, model.patch_size, model.embed_dim
    extra = 1 + model.num_registers
    groups = [(2 * b, extra + (cfg.crops.global_size // p) ** 2)]
    if cfg.crops.n_local:
        groups.append((cfg.crops.n_local * b, extra + (cfg.crops.local_size // p) ** 2))
    rates = drop_path_rates(model)
    residual = sum(n * t for n, t in groups) * model.depth * 4 * d
    if activation_checkpointing:  # block inputs, plus one block's activations in recompute
        saved = residual + max(n * t for n, t in groups) * SAVED_BYTES_PER_TOKEN_DIM * d
    else:
        branch_tokens = sum(branch_batch(n, r) * t for n, t in groups for r in rates)
        saved = residual + branch_tokens * SAVED_BYTES_PER_TOKEN_DIM * d
    n_global_patches = 2 * b * (cfg.crops.global_size // p) ** 2
    mean_ratio = (cfg.masking.ratio_min + cfg.masking.ratio_max) / 2
    masked = n_global_patches * cfg.masking.mask_probability * mean_ratio
    k = max(cfg.heads.n_prototypes, cfg.heads.ibot_n_prototypes)
    rows = sum(n for n, _ in groups) + masked
    heads = 2 * rows * k * 4 * HEAD_LOGIT_COPIES  # student and teacher
    return (state + saved + heads) / GIB


def choose_single_device_layout(cfg: SSLConfig, env: DistEnv,
                                device_memory_gib: float | None = None) -> Layout:
    """The layout of a one-process run: never FSDP2; activation checkpointing only when the
    step would not fit without it. Several ranks, or a CPU (no memory to size against), keep
    what the config says."""
    dcfg = cfg.dist
    if env.world_size > 1:
        return Layout(dcfg.fsdp, dcfg.activation_checkpointing,
                      f"{env.world_size} ranks: layout as configured")
    if device_memory_gib is None:
        if env.device.type != "cuda":
            return Layout(False, dcfg.activation_checkpointing,
                          "one process on CPU: no FSDP2, checkpointing as configured")
        device_memory_gib = torch.cuda.get_device_properties(env.device).total_memory / GIB
    budget = HEADROOM * device_memory_gib
    without = estimate_step_memory_gib(cfg, activation_checkpointing=False)
    if without <= budget:
        return Layout(False, False, f"one device: the step needs ~{without:.0f} GiB without "
                      f"activation checkpointing, {budget:.0f} GiB usable", without)
    with_ac = estimate_step_memory_gib(cfg, activation_checkpointing=True)
    return Layout(False, True, f"one device: ~{without:.0f} GiB without activation "
                  f"checkpointing > {budget:.0f} GiB usable; with it ~{with_ac:.0f} GiB", with_ac)


def apply_single_device_layout(cfg: SSLConfig, env: DistEnv) -> tuple[SSLConfig, Layout]:
    """``cfg`` with the chosen one-device layout (logged; unchanged on several ranks), and the
    layout with its reason."""
    layout = choose_single_device_layout(cfg, env)
    if env.world_size == 1:
        log.info("layout: FSDP2 %s, activation checkpointing %s (%s)",
                 "on" if layout.fsdp else "off",
                 "on" if layout.activation_checkpointing else "off", layout.reason)
    dist_cfg = dataclasses.replace(cfg.dist, fsdp=layout.fsdp,
                                   activation_checkpointing=layout.activation_checkpointing)
    return dataclasses.replace(cfg, dist=dist_cfg), layout
