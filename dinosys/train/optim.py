"""AdamW for every task: parameter groups with layer-wise lr decay driven by the model (a module
declares ``num_layers`` and ``layer_id(name)``), no weight decay on biases, norms, LayerScale and
tokens, a smaller lr for the patch embedding, and gradient clipping per module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from dinosys.config import Section, check_bounds, check_choice

_NO_WD_NAMES = ("pos_embed", "cls_token", "register_tokens", "mask_token")


@dataclass
class OptimConfig(Section):
    """AdamW, the lr / weight-decay schedules (in "epochs" of ``iters_per_epoch`` steps), layer-wise
    lr decay (the model declares its layers) and gradient clipping: every task's optimiser."""

    # peak lr at reference_batch, scaled to the global batch (lr_scaling rule)
    base_lr: float = 4e-3
    lr_scaling: str = "sqrt"  # sqrt, linear or none, relative to reference_batch
    reference_batch: int = 1024  # global batch that base_lr is given for
    min_lr: float = 1e-6  # lr at the end of the cosine decay
    # training length in epochs of iters_per_epoch steps (unless max_steps is set)
    epochs: int = 100
    iters_per_epoch: int = 1250  # steps per epoch (an 'epoch' is a fixed number of steps)
    warmup_epochs: float = 10  # linear lr warm-up from 0, in epochs
    weight_decay: float = 0.04  # weight decay at the start (cosine schedule to weight_decay_end)
    weight_decay_end: float = 0.4  # weight decay at the end of training
    layerwise_decay: float = 0.9  # lr multiplier per block from the top (1.0: off)
    patch_embed_lr_mult: float = 0.2  # extra lr multiplier of the patch embedding
    clip_grad: float = 3.0  # gradient-norm clipping per module (0: off)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon

    def validate(self) -> None:
        check_choice(self.lr_scaling, ("sqrt", "linear", "none"), "optim.lr_scaling")
        check_bounds(self, "optim", {
            "base_lr": (0, None), "min_lr": (0, None), "reference_batch": (1, None),
            "epochs": (0, None), "iters_per_epoch": (1, None), "warmup_epochs": (0, None),
            "weight_decay": (0, None), "weight_decay_end": (0, None),
            "layerwise_decay": (0, 1), "patch_embed_lr_mult": (0, None), "clip_grad": (0, None),
            "betas": (0, 1), "eps": (0, None)})


@dataclass(frozen=True)
class ParamRule:
    """Scheduling multipliers of one parameter."""

    lr_mult: float
    wd_mult: float


def module_layers(module: nn.Module) -> tuple[int, Callable[[str], int]] | None:
    """``(top layer id, name -> layer id)`` when ``module`` declares its layers (``num_layers``
    and ``layer_id(param_name)``, like timm's ``group_matcher``), else None (a head: every
    parameter at the top layer)."""
    layer_id = getattr(module, "layer_id", None)
    num_layers = getattr(module, "num_layers", None)
    if layer_id is None or num_layers is None:
        return None
    return int(num_layers) - 1, layer_id


def param_rule(name: str, param: nn.Parameter, layer: int, top: int, layered: bool,
               cfg: OptimConfig) -> ParamRule:
    """The lr / wd multipliers of one named parameter at ``layer`` of ``top``: layer-wise lr
    decay, the patch-embedding multiplier, no weight decay on biases, norms, LayerScale, tokens
    and 1-D parameters (DINOv2's ``get_params_groups`` rules)."""
    lr_mult = cfg.layerwise_decay ** (top - layer)
    if layered and "patch_embed" in name:
        lr_mult *= cfg.patch_embed_lr_mult
    no_wd = (name.endswith("bias") or "norm" in name or "gamma" in name or param.ndim <= 1
             or any(key in name for key in _NO_WD_NAMES))
    return ParamRule(lr_mult=lr_mult, wd_mult=0.0 if no_wd else 1.0)


def build_param_groups(modules: Mapping[str, nn.Module], cfg: OptimConfig) -> list[dict]:
    """AdamW groups over the trainable parameters of ``modules``. A module that declares its
    layers (see :func:`module_layers`) gets layer-wise lr decay; the others are heads at the
    top layer of the deepest declared module. Parameters sharing the same multipliers share one
    group; each group carries ``lr_mult``, ``wd_mult`` and the parameter ``names``.
    """
    layered = {key: module_layers(m) for key, m in modules.items()}
    top = max((info[0] for info in layered.values() if info is not None), default=0)
    groups: dict[ParamRule, dict] = {}
    seen: set[int] = set()
    for key, module in modules.items():
        info = layered[key]
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if info is None:
                layer, module_top = top, top
            else:
                module_top, layer_of = info
                layer = layer_of(name)
            rule = param_rule(name, param, layer, module_top, info is not None, cfg)
            group = groups.setdefault(rule, {"params": [], "names": [], "lr_mult": rule.lr_mult,
                                             "wd_mult": rule.wd_mult})
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


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set each group's lr and weight decay from the scheduled values and its multipliers."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
        group["weight_decay"] = weight_decay * group["wd_mult"]


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
