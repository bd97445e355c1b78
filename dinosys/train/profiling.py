"""Where a step's time goes: a torch.profiler trace summarised by kernel class.

Each device kernel (on CPU: each operator's self time) is put in one class: GEMM, attention,
optimizer/EMA, elementwise/norm (fused Triton kernels, norms, activations, copies), other. Idle
is the wall time during which no kernel ran (launch gaps, host waits). The top kernels by total
time come with it.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable

import torch

CLASSES = ("gemm", "attention", "optimizer", "elementwise", "other")
_RULES: list[tuple[str, re.Pattern]] = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa|_attn|mha", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|lerp", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|wgmma|cublas|^aten::(mm|addmm|bmm|matmul|"
                        r"linear)$|conv|triton_tem|sm90_", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|triton_|norm|softmax|gelu|silu|reduce|"
                               r"index|copy|cat|fill|mul|add|where|div|sum|mean|exp|log|"
                               r"^aten::", re.I)),
]


def kernel_class(name: str) -> str:
    """The class of a kernel or operator name (first matching rule; else "other")."""
    for cls, pattern in _RULES:
        if pattern.search(name):
            return cls
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_steps(step: Callable[[], object], n_steps: int, device: torch.device,
                  top: int = 15) -> dict:
    """Run ``step`` ``n_steps`` times under torch.profiler and summarise (see module doc)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    by_name: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    intervals = []
    for evt in prof.events():
        if cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.time_range.elapsed_us()
            intervals.append((evt.time_range.start, evt.time_range.end))
        else:
            on_cpu = evt.device_type == torch.autograd.DeviceType.CPU
            if not (on_cpu and evt.name.startswith("aten::")):
                continue
            us = evt.self_cpu_time_total
        by_name[evt.name] += us
        counts[evt.name] += 1
    busy = _union_us(intervals) if cuda else min(sum(by_name.values()), wall_us)
    shares = defaultdict(float)
    for name, us in by_name.items():
        shares[kernel_class(name)] += us
    summary = {
        "device": str(device), "steps": n_steps,
        "wall_ms_per_step": wall_us / 1e3 / n_steps,
        "busy_ms_per_step": busy / 1e3 / n_steps,
        "share": {cls: shares[cls] / wall_us for cls in CLASSES},
        "top": [{"name": name[:120], "class": kernel_class(name), "calls": counts[name] // n_steps,
                 "ms_per_step": us / 1e3 / n_steps, "share": us / wall_us}
                for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]],
    }
    summary["share"]["idle"] = max(0.0, 1.0 - busy / wall_us)
    return summary


def format_profile(summary: dict) -> str:
    """A readable table of :func:`profile_steps`'s summary."""
    lines = [f"profile: {summary['steps']} steps on {summary['device']}, "
             f"{summary['wall_ms_per_step']:.1f} ms/step wall, "
             f"{summary['busy_ms_per_step']:.1f} ms/step busy",
             "share: " + ", ".join(f"{k} {v:.1%}" for k, v in summary["share"].items()),
             f"{'ms/step':>9} {'share':>6} {'calls':>5}  class        kernel"]
    for row in summary["top"]:
        lines.append(f"{row['ms_per_step']:9.2f} {row['share']:6.1%} {row['calls']:5d}  "
                     f"{row['class']:<12} {row['name']}")
    return "\n".join(lines)
