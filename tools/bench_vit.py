#!/usr/bin/env python
"""Benchmark backbone forward+backward: images/s, peak memory, analytic TFLOP/s and MFU.

Per architecture and attention backend, times training steps (forward, a scalar loss over
cls + patch tokens, backward; no optimizer) on one image size or on a DINOv2 multi-crop batch
(``--multicrop``: 2B crops of 224 px + 8B crops of 98 px in one call, like the student).
FLOPs are analytic (dinosys.models.flops: matmuls only, backward = 2x forward, efficient
stochastic depth counting the samples its branches compute). MFU = model FLOP/s / peak; with
activation checkpointing the recompute is reported apart, as hardware utilisation (hw_util).
``--timm-baseline`` adds timm's DINOv2 ViT on the same crops (``timm`` row, ``vs_timm``).

    python tools/bench_vit.py --arch vit_tiny,vits14 --batch 2 --img-size 56 --steps 2
    python tools/bench_vit.py --arch vitl14,vitg14 --batch 32 --multicrop --dtype bf16 \
        --backends sdpa,xformers --peak-tflops 989

Prints a table, then one JSON object as the last line (baseline: sdpa of the same arch).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/timm_baseline.py

from timm_baseline import timm_fwd_bwd, timm_name  # noqa: E402

from dinosys.errors import UserError  # noqa: E402
from dinosys.models import (  # noqa: E402
    apply_activation_checkpointing,
    compile_blocks,
    create_backbone,
    enable_token_packing,
)
from dinosys.models.attention import xformers_unusable_reason  # noqa: E402
from dinosys.models.flops import group_train_flops  # noqa: E402
from dinosys.train.metrics import peak_tflops  # noqa: E402

LOCAL_SIZE = 98
GLOBAL_SIZE = 224


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_tiny,vits14", help="comma list of backbone names")
    p.add_argument("--batch", type=int, default=2, help="images per step (per crop set)")
    p.add_argument("--img-size", type=int, default=None,
                   help="square input size (default: the arch's img_size; ignored by --multicrop)")
    p.add_argument("--multicrop", action="store_true",
                   help=f"feed [2B x {GLOBAL_SIZE}, 8B x {LOCAL_SIZE}] crops like DINOv2 training")
    p.add_argument("--backends", default="sdpa,math,xformers",
                   help="comma list of attention backends (auto, sdpa, xformers, math)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32",
                   help="bf16: autocast over fp32 weights")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU (H100 bf16: 989); default: known GPUs only")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every block")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    p.add_argument("--pack", action="store_true",
                   help="token packing: all crops' tokens as one (T, D) tensor per block")
    p.add_argument("--timm-baseline", action="store_true",
                   help="also time timm's DINOv2 ViT (eager) on the same crops")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_inputs(batch: int, img_size: int, multicrop: bool, device: torch.device
                ) -> list[tuple[int, torch.Tensor]]:
    """(size, crops) pairs; the model receives the list of crop tensors."""
    if multicrop:
        specs = [(GLOBAL_SIZE, 2 * batch), (LOCAL_SIZE, 8 * batch)]
    else:
        specs = [(img_size, batch)]
    return [(s, torch.randn(n, 3, s, s, device=device)) for s, n in specs]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(arch: str, backend: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Time ``args.steps`` forward+backward steps of one arch/backend; returns a result row."""
    row: dict = {"arch": arch, "backend": backend}
    if backend == "xformers":
        reason = xformers_unusable_reason(device)
        if reason is not None:
            row["status"] = f"skipped: {reason}"
            return row
    model = create_backbone(arch, attn_backend=backend, drop_path_rate=args.drop_path)
    model = model.to(device).train()
    if args.activation_checkpointing:
        apply_activation_checkpointing(model)
    if args.pack:
        enable_token_packing(model)
    if args.compile:
        compile_blocks(model)
    img_size = args.img_size or model.cfg.img_size
    inputs = make_inputs(args.batch, img_size, args.multicrop, device)
    crops = [x for _, x in inputs]
    flops = sum(group_train_flops(model, s, x.shape[0]) for s, x in inputs)
    hw_flops = sum(group_train_flops(model, s, x.shape[0], args.activation_checkpointing)
                   for s, x in inputs)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step() -> None:
        with amp:
            outs = model(crops)
            loss = sum(o["x_norm_clstoken"].float().mean() + o["x_norm_patchtokens"].float().mean()
                       for o in outs)
        loss.backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(args.warmup):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        elapsed = (time.perf_counter() - start) / args.steps
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
        return row
    finally:
        model.cpu()  # free device memory for the next row
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.update(
        status="ok",
        step_ms=elapsed * 1e3,
        img_per_s=args.batch / elapsed,
        crops_per_s=sum(x.shape[0] for x in crops) / elapsed,
        tflops=flops / elapsed / 1e12,
        gflop_per_step=flops / 1e9,
    )
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # process-wide high-water mark (includes earlier rows); CPU has no per-run counter
        row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.peak_tflops:
        row["mfu"] = row["tflops"] / args.peak_tflops
        if args.activation_checkpointing:  # recompute included: utilisation, not MFU
            row["hw_util"] = hw_flops / elapsed / 1e12 / args.peak_tflops
    return row


def bench_timm(arch: str, args: argparse.Namespace, device: torch.device) -> dict:
    """timm's counterpart of ``arch`` on the same crops (forward+backward, eager)."""
    row: dict = {"arch": arch, "backend": "timm"}
    try:
        name = timm_name(arch)
    except SystemExit as exc:
        row["status"] = f"skipped: {exc}"
        return row
    img_size = args.img_size or 224
    inputs = make_inputs(args.batch, img_size, args.multicrop, device)
    result = timm_fwd_bwd(name, [x for _, x in inputs], args.dtype, args.steps, args.warmup,
                          args.drop_path)
    row["status"] = result["status"]
    if result["status"] == "ok":
        elapsed = result["step_ms"] / 1e3
        row.update(step_ms=result["step_ms"], img_per_s=args.batch / elapsed,
                   crops_per_s=sum(x.shape[0] for _, x in inputs) / elapsed,
                   timm_model=name)
        if "peak_mem_gib" in result:
            row["peak_mem_gib"] = result["peak_mem_gib"]
    return row


def format_table(rows: list[dict]) -> str:
    cols = [("arch", "{}"), ("backend", "{}"), ("status", "{}"), ("step_ms", "{:.1f}"),
            ("img_per_s", "{:.1f}"), ("crops_per_s", "{:.1f}"), ("tflops", "{:.2f}"),
            ("mfu", "{:.1%}"), ("hw_util", "{:.1%}"), ("peak_mem_gib", "{:.2f}"),
            ("peak_rss_gib", "{:.2f}"), ("speedup_vs_sdpa", "{:.2f}x"), ("vs_timm", "{:.2f}x")]
    cols = [(c, f) for c, f in cols if any(c in r for r in rows)]
    cells = [[c for c, _ in cols]]
    for r in rows:
        cells.append([f.format(r[c]) if c in r else "-" for c, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.steps < 1 or args.batch < 1:
        raise SystemExit("bench_vit: --steps and --batch must be >= 1")
    if args.peak_tflops is None:
        args.peak_tflops = peak_tflops(device, None, args.dtype)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    torch.manual_seed(0)
    rows = []
    for arch in archs:
        for backend in backends:
            try:
                row = bench_one(arch, backend, args, device)
            except (UserError, RuntimeError, NotImplementedError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                row = {"arch": arch, "backend": backend, "status": f"error: {first}"}
            rows.append(row)
            print(f"# {arch} {backend}: {row.get('status')} "
                  f"{row.get('img_per_s', 0):.1f} img/s", file=sys.stderr, flush=True)
        if args.timm_baseline:
            rows.append(bench_timm(arch, args, device))
            print(f"# {arch} timm: {rows[-1].get('status')}", file=sys.stderr, flush=True)
    for row in rows:
        base = next((r for r in rows if r["arch"] == row["arch"] and r["backend"] == "sdpa"
                     and r.get("status") == "ok"), None)
        if base is not None and row.get("status") == "ok":
            row["speedup_vs_sdpa"] = row["img_per_s"] / base["img_per_s"]
        timm = next((r for r in rows if r["arch"] == row["arch"] and r["backend"] == "timm"
                     and r.get("status") == "ok"), None)
        if timm is not None and row.get("status") == "ok" and row["backend"] != "timm":
            row["vs_timm"] = row["img_per_s"] / timm["img_per_s"]
    inputs = (f"multicrop 2x{GLOBAL_SIZE} + 8x{LOCAL_SIZE} per image" if args.multicrop
              else f"{args.img_size or 'native'} px")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device_name}, dtype {args.dtype}, batch {args.batch}, {inputs}, "
          f"steps {args.steps}, peak {args.peak_tflops} TFLOP/s")
    print(format_table(rows))
    summary = {"bench": "vit", "device": device_name, "dtype": args.dtype, "batch": args.batch,
               "multicrop": args.multicrop, "img_size": args.img_size, "steps": args.steps,
               "peak_tflops": args.peak_tflops,
               "activation_checkpointing": args.activation_checkpointing,
               "compile": args.compile, "pack": args.pack, "drop_path": args.drop_path,
               "baseline": "sdpa", "results": rows}
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
