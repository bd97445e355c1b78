"""Benchmark the full DINOv2 training step: images/s, MFU and peak memory.

The step is the real one (``dinosys.train.loop.Trainer.train_step`` on ``SSLTask``): student
multi-crop forward + backward, teacher forward, DINO/iBOT heads, DINO + iBOT + KoLeo losses,
per-module gradient clipping, AdamW step and teacher EMA. Input is synthetic (random crops,
real iBOT block masks through the data collate), made once and kept on the device, so data
loading is not measured. Warmup steps (compile, allocator) are not timed.

  python tools/bench_train.py --config mnist_tiny_cpu --steps 5              # tiny, CPU
  python tools/bench_train.py --arch vitl14 --batch-size 32 --dtype bf16     # 1 GPU, autocast
  python tools/bench_train.py --arch vitg14 --batch-size 12 --dtype bf16 --act-ckpt --fsdp
  torchrun --nproc_per_node 8 tools/bench_train.py --arch vitg14 --fsdp ...  # FSDP2 over 8

The config is SSLConfig's defaults (the DINOv2 recipe: 2x224 + 8x98 crops, 65536
prototypes) <- ``--config`` <- the flags <- trailing ``key=value`` overrides. ``--fsdp`` shards
with FSDP2 (params in --dtype, fp32 reduce) even on one device; without it a single process
uses autocast. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/timm_baseline.py

from timm_baseline import timm_fwd_bwd, timm_name  # noqa: E402

from dinosys.atomic import write_atomic  # noqa: E402
from dinosys.config import load_config  # noqa: E402
from dinosys.data.collate import collate_ssl  # noqa: E402
from dinosys.data.masking import MaskGenerator  # noqa: E402
from dinosys.distributed.env import (  # noqa: E402
    DistEnv,
    close_process_groups,
    init_distributed,
    seed_everything,
)
from dinosys.distributed.layout import apply_single_device_layout  # noqa: E402
from dinosys.train.device_step import read_scalars  # noqa: E402
from dinosys.train.loop import Trainer  # noqa: E402
from dinosys.train.metrics import peak_tflops  # noqa: E402
from dinosys.train.profiling import format_profile, profile_steps  # noqa: E402
from dinosys.train.tasks.ssl import SSLConfig, SSLTask  # noqa: E402

log = logging.getLogger("bench_train")


@dataclasses.dataclass
class _ShardedSingleProcess(DistEnv):
    """One rank that still shards with FSDP2 (so no autocast: FSDP2 casts the params)."""

    @property
    def is_distributed(self) -> bool:
        return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="train config (path or name under configs/)")
    p.add_argument("--arch", default=None, help="model.arch, e.g. vit_tiny, vitl14, vitg14")
    p.add_argument("--batch-size", type=int, default=None, help="images per device")
    p.add_argument("--attn-backend", default=None, choices=["auto", "sdpa", "xformers", "math"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="compute dtype (dist.param_dtype)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--pack", action="store_true",
                   help="token packing (dist.pack_tokens): all crops' tokens as one (T, D) "
                        "tensor per block")
    p.add_argument("--act-ckpt", action="store_true",
                   help="force activation checkpointing per block")
    p.add_argument("--fsdp", action="store_true", help="force FSDP2 (also on a single device)")
    p.add_argument("--layout", choices=["auto", "config"], default="auto",
                   help="auto: on one device, no FSDP2 and no activation checkpointing when the "
                        "step fits (dinosys.distributed.layout; --fsdp/--act-ckpt force them); "
                        "config: as the config says")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps (torch.profiler summary: top "
                        "kernels, share of GEMM/attention/elementwise/optimizer/idle)")
    p.add_argument("--timm-baseline", action="store_true",
                   help="also time timm's DINOv2 ViT forward+backward on the same crops")
    p.add_argument("--out", type=Path, default=None,
                   help="write the JSON here (and the profile next to it: NAME.profile.txt)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for MFU (known GPUs: automatic)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> SSLConfig:
    flags = []
    if args.arch:
        flags.append(f"model.arch={args.arch}")
    if args.batch_size:
        flags.append(f"data.batch_size_per_gpu={args.batch_size}")
    if args.attn_backend:
        flags.append(f"model.attn_backend={args.attn_backend}")
    if args.dtype:
        flags.append(f"dist.param_dtype={args.dtype}")
    if args.compile:
        flags.append("dist.compile=true")
    if args.act_ckpt:
        flags.append("dist.activation_checkpointing=true")
    if args.pack:
        flags.append("dist.pack_tokens=true")
    flags.append(f"dist.fsdp={'true' if args.fsdp else 'false'}")
    flags.append(f"max_steps={max(10**6, args.warmup + args.steps)}")
    return load_config(SSLConfig, args.config, [*flags, *args.overrides], kind="train")


def setup_env(args: argparse.Namespace) -> DistEnv:
    """The process layout; a one-process --fsdp run gets a one-rank process group."""
    env = init_distributed()
    if env.is_distributed or not args.fsdp:
        return env
    import torch.distributed as dist

    backend = "nccl" if env.device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return _ShardedSingleProcess(rank=0, world_size=1, local_rank=0, device=env.device,
                                 backend=backend, launcher=env.launcher)


def synthetic_batch(cfg: SSLConfig, patch_size: int, device: torch.device) -> dict:
    """One rank's batch with the loader's layout: random crops, real iBOT block masks."""
    b, c = cfg.data.batch_size_per_gpu, cfg.model.in_chans
    gen = torch.Generator().manual_seed(cfg.seed)
    samples = [{"global_crops": [torch.randn(c, cfg.crops.global_size, cfg.crops.global_size,
                                             generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(c, cfg.crops.local_size, cfg.crops.local_size,
                                            generator=gen) for _ in range(cfg.crops.n_local)],
                "label": -1} for _ in range(b)]
    mask_gen = MaskGenerator(cfg.crops.global_size // patch_size, cfg.masking)
    batch = collate_ssl(samples, mask_gen, np.random.default_rng(cfg.seed))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[float, float | None]:
    """(allocated, reserved) peak GiB on CUDA; peak resident set size and None on CPU."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) / 2**30,
                torch.cuda.max_memory_reserved(device) / 2**30)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None


def run(args: argparse.Namespace) -> dict:
    cfg = build_config(args)
    env = setup_env(args)
    layout_reason = "as configured"
    if args.layout == "auto" and not env.is_distributed and not (args.fsdp or args.act_ckpt):
        cfg, layout = apply_single_device_layout(cfg, env)
        layout_reason = layout.reason
    seed_everything(cfg.seed, env.rank)
    with torch.device(env.device):  # initialise on the device: seconds, not minutes, for ViT-g
        task = SSLTask(cfg, env)
    task.shard()  # FSDP2 when sharding
    batch = synthetic_batch(cfg, task.patch_size, env.device)
    step_flops = task.step_flops(batch)
    n_params = sum(p.numel() for p in task.student["backbone"].parameters())  # DTensor: global
    world = env.world_size
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        trainer = Trainer(task, None, cfg, env, Path(tmp), cfg.max_steps,
                          cfg.data.batch_size_per_gpu * world)
        times, applied, losses = [], 0, []
        for step in range(args.warmup + args.steps):
            if step == args.warmup and env.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(env.device)
            _sync(env.device)
            t0 = time.perf_counter()
            ok, logs = trainer.train_step([batch], step)
            _sync(env.device)
            dt = time.perf_counter() - t0
            ok, logs = bool(ok), read_scalars(logs)
            if step >= args.warmup:
                times.append(dt)
                applied += int(ok)
                losses.append(logs.get("loss", float("nan")))
            if env.is_main:
                log.info("step %d: %.1f ms, loss %.4f%s", step, dt * 1e3,
                         logs.get("loss", float("nan")), "" if ok else " (skipped: non-finite)")
        profile = None
        if args.profile:
            step_no = iter(range(args.warmup + args.steps, 10**9))
            profile = profile_steps(lambda: trainer.train_step([batch], next(step_no)),
                                    args.profile, env.device)
    timm = None
    if args.timm_baseline:
        crops = [batch["global_crops"]]
        if batch["local_crops"].numel():
            crops.append(batch["local_crops"])
        del trainer, task  # free the device for timm
        gc.collect()
        try:
            name = timm_name(cfg.model.arch)
        except SystemExit as exc:
            timm = {"status": f"skipped: {exc}"}
        else:
            timm = timm_fwd_bwd(name, crops, cfg.dist.param_dtype, args.steps, args.warmup,
                                cfg.model.drop_path_rate)
    # the slowest rank sets the pace
    mean_t = sum(times) / len(times)
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([mean_t], dtype=torch.float64, device=env.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        mean_t = float(t.item())
    flops = step_flops  # per rank, model FLOPs (no recompute)
    peak = peak_tflops(env.device, args.peak_tflops, cfg.dist.param_dtype)
    mem_alloc, mem_reserved = peak_memory(env.device)
    result = {
        "arch": cfg.model.arch, "backbone_params_m": round(n_params / 1e6, 1),
        "device": (torch.cuda.get_device_name(env.device) if env.device.type == "cuda"
                   else "cpu"),
        "world_size": world, "batch_per_device": cfg.data.batch_size_per_gpu,
        "crops": f"2x{cfg.crops.global_size}+{cfg.crops.n_local}x{cfg.crops.local_size}",
        "dtype": cfg.dist.param_dtype, "attn_backend": cfg.model.attn_backend,
        "compile": cfg.dist.compile, "act_ckpt": cfg.dist.activation_checkpointing,
        "pack": cfg.dist.pack_tokens,
        "fsdp": isinstance(env, _ShardedSingleProcess) or (env.is_distributed and cfg.dist.fsdp),
        "layout_reason": layout_reason, "drop_path_rate": cfg.model.drop_path_rate,
        "n_prototypes": cfg.heads.n_prototypes,
        "step_ms_mean": round(mean_t * 1e3, 2),
        "step_ms_median": round(statistics.median(times) * 1e3, 2),
        "images_per_s": round(cfg.data.batch_size_per_gpu * world / mean_t, 2),
        "tflops_per_device": round(flops / mean_t / 1e12, 3),
        "mfu": round(flops / mean_t / (peak * 1e12), 4) if peak else None,
        "peak_tflops_per_device": peak,
        "peak_mem_gib": round(mem_alloc, 2),
        "peak_mem_reserved_gib": round(mem_reserved, 2) if mem_reserved is not None else None,
        "steps_timed": len(times), "steps_applied": applied,
        "last_loss": losses[-1] if losses and math.isfinite(losses[-1]) else None,
        "gflop_per_step": round(flops / 1e9, 1),
    }
    if timm is not None:
        result["timm"] = timm
        if timm["status"] == "ok":
            timm_ips = cfg.data.batch_size_per_gpu / (timm["step_ms"] / 1e3)
            timm["images_per_s"] = round(timm_ips, 2)
            # the full DINOv2 step (teacher, heads, optimizer too) against timm's backbone alone
            result["speedup_vs_timm_backbone"] = round(result["images_per_s"] / timm_ips, 3)
    if profile is not None:
        result["profile"] = profile
    return result


def print_table(result: dict) -> None:
    width = max(len(k) for k in result)
    print("-" * (width + 30))
    for key, value in result.items():
        if key != "profile":
            print(f"{key:<{width}}  {value}")
    print("-" * (width + 30))
    if "profile" in result:
        print(format_profile(result["profile"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    result = run(args)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        print_table(result)
        if args.out is not None:
            write_atomic(args.out, json.dumps(result, sort_keys=True, indent=1) + "\n")
            if "profile" in result:
                write_atomic(args.out.with_suffix(".profile.txt"),
                             format_profile(result["profile"]) + "\n")
        print(json.dumps(result, sort_keys=True), flush=True)
    close_process_groups()  # rank 0 printed above: no peer may exit before it is done
    return 0 if result["steps_applied"] == result["steps_timed"] else 1


if __name__ == "__main__":
    sys.exit(main())
