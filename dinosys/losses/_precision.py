"""Loss arithmetic runs in fp32, or float64 when given float64 (exact gradient tests)."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_fp32(x: Tensor) -> Tensor:
    """`x` as float32 unless it is already float64."""
    return x if x.dtype == torch.float64 else x.float()
