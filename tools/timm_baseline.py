"""The same-run reference: timm's DINOv2 ViT forward+backward on the DINOv2 multi-crop batch.

timm cannot mix crop sizes in one call, so each crop size is one forward (as a plain ViT
training loop would do); the loss is a scalar over cls + patch tokens, like bench_vit's. Used
by tools/bench_vit.py and tools/bench_train.py (``--timm-baseline``).
"""

from __future__ import annotations

import time

import torch

TIMM_NAMES = {"vits14": "vit_small_patch14_dinov2", "vitb14": "vit_base_patch14_dinov2",
              "vitl14": "vit_large_patch14_dinov2", "vitg14": "vit_giant_patch14_dinov2"}


def timm_name(arch: str) -> str:
    """timm's model name of a dinosys backbone name (registers: the ``_reg4`` models)."""
    base = arch.removesuffix("_reg")
    if base not in TIMM_NAMES:
        raise SystemExit(f"no timm counterpart of {arch!r}; known: {sorted(TIMM_NAMES)}")
    name = TIMM_NAMES[base]
    return name.replace("_dinov2", "_reg4_dinov2") if arch.endswith("_reg") else name


def timm_fwd_bwd(name: str, crops: list[torch.Tensor], dtype: str, steps: int, warmup: int,
                 drop_path: float = 0.0, compile_model: bool = False) -> dict:
    """Time ``steps`` timm forward+backward passes over ``crops`` (list of (N, 3, S, S))."""
    from dinosys.export.compat import import_timm

    timm = import_timm()
    device = crops[0].device
    size = max(c.shape[-1] for c in crops)
    model = timm.create_model(name, pretrained=False, img_size=size, dynamic_img_size=True,
                              drop_path_rate=drop_path).to(device).train()
    if compile_model:
        model.compile(dynamic=False)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step() -> None:
        with amp:
            loss = sum(model.forward_features(c).float().mean() for c in crops)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        dt = (time.perf_counter() - t0) / steps
    except torch.OutOfMemoryError:
        return {"timm_model": name, "status": "OOM"}
    finally:
        model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"timm_model": name, "status": "ok", "compile": compile_model,
           "step_ms": round(dt * 1e3, 2)}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out
