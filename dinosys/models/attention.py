"""Multi-head self-attention over a list of token groups, with interchangeable backends.

Each element of the input list is one group of same-length sequences, shape (B_i, N_i, D)
(the backbone concatenates crops of the same size into one group). Backends:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` once per group (flash /
  memory-efficient kernels on GPU, a fused kernel on CPU).
- ``xformers``: every sequence of every group packed into ONE sequence and attended with a
  block-diagonal mask (``xformers.ops.fmha.BlockDiagonalMask``): one kernel launch for all
  crops, as in DINOv2 training. CUDA only; xformers is an optional import.
- ``math``: softmax(q k^T / sqrt(d)) v written out in plain torch (reference; any device).
- ``auto``: xformers when importable, on CUDA and in half precision, else sdpa.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinosys.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers", "math")


@functools.cache
def _xformers_ops():  # type: ignore[no-untyped-def]
    """The ``xformers.ops`` module, or None when xformers is not installed or fails to import."""
    try:
        import xformers.ops as xops
        from xformers.ops import fmha  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build (missing CUDA libs)
        log.debug("xformers unavailable: %s", exc)
        return None
    return xops


def xformers_available() -> bool:
    """Whether ``xformers.ops.memory_efficient_attention`` can be imported."""
    return _xformers_ops() is not None


@functools.cache
def xformers_unusable_reason(device: torch.device) -> str | None:
    """None if xformers attention runs on ``device``, else why not (checked once per device).

    Importing is not enough: a wheel built for another torch/CUDA imports but has no kernels.
    """
    if device.type != "cuda":
        return "xformers attention needs a CUDA device"
    xops = _xformers_ops()
    if xops is None:
        return "xformers is not installed (pip install 'dinosys[gpu]')"
    try:
        q = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q, attn_bias=_block_diagonal_mask((4, 4)))
    except Exception as exc:  # NotImplementedError (no kernel), RuntimeError (ABI mismatch)
        reason = f"xformers is installed but cannot run here: {str(exc).splitlines()[0]}"
        log.warning("%s; using torch SDPA instead", reason)
        return reason
    return None


def resolve_backend(backend: str, x: Tensor) -> str:
    """The concrete backend ("sdpa", "xformers" or "math") for input ``x``.

    An explicit ``xformers`` request that cannot run (not installed, or a CPU tensor) is a
    UserError; ``auto`` falls back to sdpa silently.
    """
    if backend == "auto":
        if (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and xformers_available()
                and xformers_unusable_reason(x.device) is None):
            return "xformers"
        return "sdpa"
    if backend == "xformers":
        reason = xformers_unusable_reason(x.device)
        if reason is not None:
            raise UserError(f"attention backend 'xformers': {reason}; "
                            "use model.attn_backend=sdpa (or auto)")
        return "xformers"
    if backend not in BACKENDS:
        raise UserError(f"unknown attention backend {backend!r}; choose one of {list(BACKENDS)}")
    return backend


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Reference attention on (B, H, N, d) tensors; softmax in fp32."""
    scale = q.shape[-1] ** -0.5
    logits = (q * scale) @ k.transpose(-2, -1)
    return logits.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v


@functools.lru_cache(maxsize=64)
def _block_diagonal_mask(seqlens: tuple[int, ...]):  # type: ignore[no-untyped-def]
    from xformers.ops.fmha import BlockDiagonalMask

    return BlockDiagonalMask.from_seqlens(list(seqlens))


class Attention(nn.Module):
    """Self-attention with fused ``qkv`` and output ``proj`` (released DINOv2 names)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise UserError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        """Attend within each sequence of each group; returns outputs shaped like ``xs``."""
        backend = resolve_backend(self.backend, xs[0])
        if backend == "xformers":
            return self._forward_packed(xs)
        return [self._forward_group(x, backend) for x in xs]

    def _forward_group(self, x: Tensor, backend: str) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = math_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward_packed(self, x: Tensor, layout: tuple[tuple[int, int], ...]) -> Tensor:
        """Attention over packed tokens ``x`` (T, D) of groups ``layout`` ((B_i, N_i), ...):
        one qkv and one output projection for every token; each group's sequences attend
        within themselves (dense per-group SDPA, or one xformers block-diagonal call)."""
        backend = resolve_backend(self.backend, x)
        t, d = x.shape
        h = self.num_heads
        qkv = self.qkv(x)
        if backend == "xformers":
            seqlens = tuple(n for b, n in layout for _ in range(b))
            q, k, v = qkv.reshape(1, t, 3, h, d // h).unbind(2)
            out = _xformers_ops().memory_efficient_attention(
                q, k, v, attn_bias=_block_diagonal_mask(seqlens))
            return self.proj(out.reshape(t, d))
        outs = []
        for part, (b, n) in zip(qkv.split([b * n for b, n in layout]), layout):
            q, k, v = part.reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
            o = (F.scaled_dot_product_attention(q, k, v) if backend == "sdpa"
                 else math_attention(q, k, v))
            outs.append(o.transpose(1, 2).reshape(b * n, d))
        return self.proj(torch.cat(outs) if len(outs) > 1 else outs[0])

    def _forward_packed(self, xs: list[Tensor]) -> list[Tensor]:
        xops = _xformers_ops()
        d = xs[0].shape[-1]
        seqlens: list[int] = []
        for x in xs:
            seqlens.extend([x.shape[1]] * x.shape[0])
        packed = torch.cat([x.reshape(1, -1, d) for x in xs], dim=1)
        total = packed.shape[1]
        qkv = self.qkv(packed).reshape(1, total, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.unbind(2)
        bias = _block_diagonal_mask(tuple(seqlens))
        out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
        out = self.proj(out.reshape(1, total, d))
        sizes = [x.shape[0] * x.shape[1] for x in xs]
        return [o.reshape(x.shape) for o, x in zip(out.split(sizes, dim=1), xs)]
