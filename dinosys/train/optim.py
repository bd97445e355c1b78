"""AdamW parameter groups of DINOv2: layer-wise lr decay, no weight decay on biases, norms,
LayerScale and tokens, a smaller lr for the patch embedding, a frozen head last layer early on,
and gradient clipping per module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dinosys.config import OptimConfig

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_LAYER0 = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
_NO_WD_NAMES = ("pos_embed", "cls_token", "register_tokens", "mask_token")


@dataclass(frozen=True)
class ParamRule:
    """Scheduling multipliers of one parameter."""

    lr_mult: float
    wd_mult: float
    is_last_layer: bool


def backbone_layer_id(name: str, depth: int) -> int:
    """0 for the embeddings and tokens, i+1 for ``blocks.i``, depth+1 for the rest (final norm)."""
    if any(key in name for key in _LAYER0):
        return 0
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def param_rule(name: str, param: nn.Parameter, *, is_backbone: bool, depth: int,
               cfg: OptimConfig) -> ParamRule:
    """The lr / wd multipliers of one named parameter (DINOv2's ``get_params_groups`` rules)."""
    layer = backbone_layer_id(name, depth) if is_backbone else depth + 1
    lr_mult = cfg.layerwise_decay ** (depth + 1 - layer)
    if is_backbone and "patch_embed" in name:
        lr_mult *= cfg.patch_embed_lr_mult
    no_wd = (name.endswith("bias") or "norm" in name or "gamma" in name or param.ndim <= 1
             or any(key in name for key in _NO_WD_NAMES))
    return ParamRule(lr_mult=lr_mult, wd_mult=0.0 if no_wd else 1.0,
                     is_last_layer="last_layer" in name)


def build_param_groups(modules: Mapping[str, nn.Module], depth: int, cfg: OptimConfig,
                       backbone_key: str = "backbone") -> list[dict]:
    """AdamW groups over the trainable parameters of ``modules`` (the backbone under
    ``backbone_key``; every other module is a head at the top layer). Parameters sharing the same
    multipliers share one group; each group carries ``lr_mult``, ``wd_mult``, ``is_last_layer``.
    """
    groups: dict[ParamRule, dict] = {}
    seen: set[int] = set()
    for key, module in modules.items():
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            rule = param_rule(name, param, is_backbone=key == backbone_key, depth=depth, cfg=cfg)
            group = groups.setdefault(rule, {
                "params": [], "names": [], "lr_mult": rule.lr_mult, "wd_mult": rule.wd_mult,
                "is_last_layer": rule.is_last_layer,
            })
            group["params"].append(param)
            group["names"].append(f"{key}.{name}")
    return list(groups.values())


def _fused_capable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: plain (not DTensor)
    floating-point tensors on one CUDA device, or on the CPU."""
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cuda", "cpu")
            and all(type(p) is nn.Parameter or type(p) is torch.Tensor for p in params)
            and all(p.is_floating_point() for p in params))


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the groups; lr and weight decay are set every step by :func:`apply_schedule`.

    The fused kernel (one launch for all parameters, and able to skip a non-finite step on
    the device: dinosys.train.device_step) where the parameters allow it, else foreach.
    """
    torch_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and _fused_capable(params)
    return torch.optim.AdamW(torch_groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=0.0, **({"fused": True} if fused else {"foreach": True}))


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                   last_layer_frozen: bool) -> None:
    """Set each group's lr and weight decay from the scheduled values and its multipliers."""
    for group in optimizer.param_groups:
        frozen = last_layer_frozen and group["is_last_layer"]
        group["lr"] = 0.0 if frozen else lr * group["lr_mult"]
        group["weight_decay"] = weight_decay * group["wd_mult"]


def zero_last_layer_grads(modules: Iterable[nn.Module]) -> None:
    """Drop the gradients of the heads' last layers (frozen during the first epochs)."""
    for module in modules:
        for name, param in module.named_parameters():
            if "last_layer" in name:
                param.grad = None


def clip_grad_per_module(modules: Mapping[str, nn.Module], max_norm: float
                         ) -> dict[str, torch.Tensor]:
    """Clip each module's gradients separately (DINOv2 clips backbone and heads one by one).

    Works on plain and FSDP2 (DTensor) gradients. Returns each module's norm before clipping as
    a 0-d device tensor (no host sync; non-finite when a gradient is). ``max_norm <= 0`` only
    measures.
    """
    norms: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, module in modules.items():
        params = [p for p in module.parameters() if p.grad is not None and id(p) not in seen]
        seen.update(id(p) for p in params)
        if not params:
            continue
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norms[key] = norm.detach()
    return norms
