"""A training step that never waits on the device: finite checks, skipping and logging as
device tensors.

The step's loss and gradient-norm checks, the "skip this step" decision and every logged scalar
stay on the device; the caller reads them once, after the step (:func:`read_scalars`), where it
synchronises anyway. A non-finite step is skipped without a host round trip: the fused AdamW
kernel takes a ``found_inf`` flag (as with a GradScaler) and leaves parameters, moments and step
counts untouched, and the teacher EMA weight is multiplied by the same flag.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist


def finite_flag(value: torch.Tensor) -> torch.Tensor:
    """0-d float tensor: 1.0 when ``value`` is finite on every rank, else 0.0 (no host sync)."""
    ok = torch.isfinite(value.detach()).all().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ok = ok.clone()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok


def optimizer_is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """True when every group uses the fused kernel (which can skip a step by itself)."""
    return all(g.get("fused") for g in optimizer.param_groups)


def guarded_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()`` only where ``ok`` is 1. Fused optimizers decide on the device
    (``found_inf``); others need the flag on the host (one sync)."""
    if optimizer_is_fused(optimizer):
        optimizer.found_inf = (1.0 - ok).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(ok):
        optimizer.step()


def read_scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """Plain floats of a dict of 0-d tensors and numbers: one device-to-host copy in all."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in values.items() if k not in keys}
    if keys:
        flat = torch.stack([values[k].detach().float().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, flat))
    return {k: out[k] for k in values}
