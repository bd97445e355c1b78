#!/usr/bin/env python
"""Benchmark a full CLIP training step, ours next to open_clip's, same towers and batch.

A step is what a CLIP trainer does per batch: encode images and texts, the symmetric InfoNCE
loss (features gathered across ranks: a no-op on one process), backward, AdamW, logit-scale
clamp. Ours: ``dinosys.models.clip.CLIPModel`` (DINOv2 ViT + causal text tower) with
``dinosys.losses.clip.clip_loss``. open_clip's: ``open_clip.CLIP`` with the same image tower
size (its own ViT: width, depth, heads, patch) and text tower, ``open_clip.loss.ClipLoss``, the
step of open_clip's ``training/train.py``. The two alternate in rounds so that load from other
processes hits both alike; samples/s is the median over rounds. Captions are real-length MNIST
captions tokenised to the 77-token context (both models get the same ids).

    python tools/bench_clip.py                     # tiny towers on CPU
    python tools/bench_clip.py --size b16 --dtype bf16 --batch 256   # ViT-B/16 + 12-layer text

Prints a table, then one JSON object as the last line (``ratio`` = ours / open_clip).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinosys.data.captions import digit_caption  # noqa: E402
from dinosys.data.tokenizer import get_tokenizer  # noqa: E402
from dinosys.losses.clip import clamp_logit_scale_, clip_loss  # noqa: E402
from dinosys.models.clip import CLIPModel, ClipModelConfig, ImageTowerConfig  # noqa: E402
from dinosys.models.text import TextConfig  # noqa: E402
from dinosys.models.vit import BackboneConfig  # noqa: E402

# name -> (image size, patch, width, depth, heads, text width, text layers, text heads, embed)
SIZES = {
    "tiny": (56, 14, 192, 6, 3, 128, 4, 4, 128),
    "b16": (224, 16, 768, 12, 12, 512, 12, 8, 512),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each: steps per model)")
    p.add_argument("--steps", type=int, default=2, help="steps per model per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="autocast dtype (bf16 on GPU is open_clip's amp_bf16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def _ours(size: tuple, device: str) -> torch.nn.Module:
    img, patch, width, depth, heads, tw, tl, th, embed = size
    backbone = BackboneConfig(arch="vit_tiny", img_size=img, patch_size=patch, embed_dim=width,
                              depth=depth, num_heads=heads, layerscale_init=None)
    cfg = ClipModelConfig(embed_dim=embed, image=ImageTowerConfig(backbone=backbone),
                          text=TextConfig(width=tw, layers=tl, heads=th))
    return CLIPModel(cfg).to(device).train()


def _open_clip(size: tuple, device: str) -> torch.nn.Module:
    from dinosys.export.compat import import_torchvision

    import_torchvision()
    import open_clip

    img, patch, width, depth, heads, tw, tl, th, embed = size
    model = open_clip.CLIP(
        embed_dim=embed,
        vision_cfg={"image_size": img, "patch_size": patch, "width": width, "layers": depth,
                    "head_width": width // heads},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": tw, "heads": th,
                  "layers": tl},
    )
    return model.to(device).train()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _step_fns(args: argparse.Namespace, size: tuple):  # type: ignore[no-untyped-def]
    from dinosys.export.compat import import_torchvision

    import_torchvision()
    from open_clip.loss import ClipLoss

    device = torch.device(args.device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else nullcontext())
    ours = _ours(size, args.device)
    theirs = _open_clip(size, args.device)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.1)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=0.1)
    loss_theirs = ClipLoss(local_loss=True, gather_with_grad=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size[0], size[0], generator=g).to(device)
    texts = [digit_caption("mnist", i, i % 10) for i in range(args.batch)]
    tokens = get_tokenizer()(texts).to(device)

    def step_ours() -> None:
        with autocast:
            img, txt = ours(images, tokens)
            loss = clip_loss(img, txt, ours.logit_scale)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()
        clamp_logit_scale_(ours.logit_scale)

    def step_theirs() -> None:
        with autocast:
            img, txt, scale = theirs(images, tokens)
            loss = loss_theirs(img, txt, scale)
        opt_theirs.zero_grad(set_to_none=True)
        loss.backward()
        opt_theirs.step()
        with torch.no_grad():
            theirs.logit_scale.clamp_(0, 4.6052)

    return (step_ours, _params(ours)), (step_theirs, _params(theirs)), tokens


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, steps: int, device: str) -> float:  # type: ignore[no-untyped-def]
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    size = SIZES[args.size]
    torch.manual_seed(0)
    (ours, p_ours), (theirs, p_theirs), tokens = _step_fns(args, size)
    for _ in range(args.warmup):
        ours()
        theirs()
    rates: dict[str, list[float]] = {"ours": [], "open_clip": []}
    for _ in range(args.rounds):
        for name, fn in (("ours", ours), ("open_clip", theirs)):
            rates[name].append(args.steps * args.batch / _time(fn, args.steps, args.device))
    med = {k: statistics.median(v) for k, v in rates.items()}
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"cpu ({torch.get_num_threads()} threads)")
    result = {
        "bench": "clip_train_step", "size": args.size, "batch": args.batch, "dtype": args.dtype,
        "device": device_name, "date": date.today().isoformat(), "commit": _commit(),
        "params": {"ours": p_ours, "open_clip": p_theirs},
        "text_tokens_used": int(tokens.argmax(dim=1).max()) + 1,
        "samples_per_s": {k: round(v, 2) for k, v in med.items()},
        "rounds": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "ratio": round(med["ours"] / med["open_clip"], 3),
    }
    print(f"{'model':<10} {'params':>10} {'samples/s':>10}")
    for name in ("ours", "open_clip"):
        print(f"{name:<10} {result['params'][name]:>10} {med[name]:>10.1f}")
    print(f"ratio ours/open_clip: {result['ratio']:.3f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
