"""Gradient accumulation (``dist.grad_accum_steps``): exact equivalence with one big batch, and
a real two-rank run that consumes ``grad_accum_steps`` loader batches per step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinosys.data.multicrop import build_ssl_loader
from dinosys.distributed.env import DistEnv
from dinosys.train.device_step import read_scalars
from dinosys.train.loop import Trainer
from dinosys.train.tasks.ssl import SSLConfig, SSLTask
from tests.train.test_dist_train import torchrun

B = 4  # images per micro-batch
# everything that couples samples across micro-batches is neutralised: no KoLeo (batch-wide
# nearest neighbours), a frozen centre (momentum 1: the teacher targets of micro-batch 2 do not
# depend on micro-batch 1), no stochastic depth, fp32; the last layer trains from step 0
EXACT = ["loss.koleo_weight=0", "loss.center_momentum=1.0", "model.drop_path_rate=0",
         "dist.param_dtype=fp32", "optim.freeze_last_layer_epochs=0",
         f"data.batch_size_per_gpu={B}", "checkpoint.every_n_steps=0"]


def merge_batches(b1: dict, b2: dict) -> dict:
    """The batch of 2B images that ``b1`` then ``b2`` form, in collate's crop-major order, with
    mask indices and per-image weights recomputed from the merged masks."""

    def crop_major(x1: torch.Tensor, x2: torch.Tensor, n: int) -> torch.Tensor:
        if x1.numel() == 0:
            return x1
        parts = [p for c in range(x1.shape[0] // n)
                 for p in (x1[c * n:(c + 1) * n], x2[c * n:(c + 1) * n])]
        return torch.cat(parts)

    n = int(b1["batch_size"])
    assert int(b2["batch_size"]) == n
    masks = crop_major(b1["masks"], b2["masks"], n)
    indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1).clamp(min=1).float()
    weights = (1.0 / per_image)[indices // masks.shape[1]]
    return {"global_crops": crop_major(b1["global_crops"], b2["global_crops"], n),
            "local_crops": crop_major(b1["local_crops"], b2["local_crops"], n),
            "masks": masks, "mask_indices": indices, "mask_weights": weights,
            "n_masked": int(indices.numel()), "batch_size": 2 * n,
            "labels": torch.cat([b1["labels"], b2["labels"]])}


def make_trainer(cfg: SSLConfig, loader, run_dir: Path) -> Trainer:
    torch.manual_seed(1234)
    task = SSLTask(cfg, DistEnv())
    return Trainer(task, loader, cfg, DistEnv(), run_dir, total_steps=10, total_batch=2 * B)


def flat_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` less the key third of a fused qkv bias. Softmax is invariant to it, so its
    true gradient is 0 and what backward gives is rounding noise, which AdamW's first steps
    (g / (|g| + eps)) blow up to lr-sized, order-dependent updates."""
    if not name.endswith("attn.qkv.bias"):
        return value
    d = value.shape[0] // 3
    return torch.cat([value[:d], value[2 * d:]])


def test_accumulated_step_equals_the_merged_batch_step(tiny_cfg, tmp_path: Path) -> None:
    accum_cfg = tiny_cfg(*EXACT, "dist.grad_accum_steps=2")
    merged_cfg = tiny_cfg(*EXACT, "dist.grad_accum_steps=1")
    loader = build_ssl_loader(accum_cfg, 0, 1, patch_size=accum_cfg.model.patch_size)
    it = iter(loader)
    micro = [next(it) for _ in range(4)]  # two steps of two micro-batches
    assert micro[0]["masks"].any(), "the test needs iBOT-masked tokens"

    accum = make_trainer(accum_cfg, loader, tmp_path / "accum")
    merged = make_trainer(merged_cfg, loader, tmp_path / "merged")
    initial = flat_state(accum.task.student)
    for name, value in flat_state(merged.task.student).items():
        assert torch.equal(value, initial[name]), name

    for step in (1, 2):  # lr > 0 from step 1 (warmup); the 2nd step also runs on AdamW moments
        pair = micro[2 * (step - 1): 2 * step]
        ok_a, logs_a = accum.train_step(pair, step)
        ok_m, logs_m = merged.train_step([merge_batches(*pair)], step)
        ok_a, ok_m = bool(ok_a), bool(ok_m)
        logs_a, logs_m = read_scalars(logs_a), read_scalars(logs_m)
        assert ok_a and ok_m
        assert logs_a["loss"] == pytest.approx(logs_m["loss"], rel=1e-6)
        for key in ("dino_loss", "dino_global_loss", "dino_local_loss", "ibot_loss"):
            assert logs_a[key] == pytest.approx(logs_m[key], rel=1e-6), key
        # AdamW is nearly scale-invariant: the gradient norms are what catch a wrong 1/n
        norms = [k for k in logs_m if k.startswith("grad_norm/")]
        assert norms
        for key in norms:
            assert logs_m[key] > 0
            assert logs_a[key] == pytest.approx(logs_m[key], rel=1e-5), key

    for part in ("student", "teacher"):
        a = flat_state(getattr(accum.task, part))
        m = flat_state(getattr(merged.task, part))
        for name in m:
            # atol: Adam divides by sqrt(v) + eps, so an entry whose gradient is ~0 moves by a
            # float-rounding-sized amount that the fused kernel does not cancel exactly
            torch.testing.assert_close(without_key_bias(name, a[name]),
                                       without_key_bias(name, m[name]), rtol=1e-6, atol=1e-6,
                                       msg=lambda m, name=name, part=part: f"{part}.{name}: {m}")
    moved = max((flat_state(accum.task.student)[k] - v).abs().max().item()
                for k, v in initial.items())
    assert moved > 1e-4  # the steps really changed the weights


@pytest.mark.dist
def test_torchrun_two_ranks_with_grad_accum(tiny_args, tiny_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    steps, accum, world = 3, 2, 2
    overrides = tiny_args(f"max_steps={steps}", f"dist.grad_accum_steps={accum}",
                          f"data.batch_size_per_gpu={B}", "checkpoint.every_n_steps=0")
    proc = torchrun(["-m", "dinosys.cli", "train", "mnist_tiny_cpu", "--out", str(run),
                     *overrides], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and all(s["status"] == "finished" and s["step"] == steps
                             for s in summaries)

    records = [r for r in (json.loads(line) for line in
                           (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    # images/s and TFLOP/s share one window, so their ratio is the FLOPs per image counted;
    # the FLOPs are summed over every micro-batch, so counting only one micro-batch's images
    # (or a step's images twice) moves the ratio by 2x from a B-image batch's FLOPs per image
    cfg = tiny_cfg(f"data.batch_size_per_gpu={B}")
    task = SSLTask(cfg, DistEnv())
    it = iter(build_ssl_loader(cfg, 0, 1, patch_size=task.patch_size))
    expected = sum(task.step_flops(next(it)) for _ in range(4)) / (4 * B)
    for r in records:
        assert r["images_per_s"] > 0
        assert r["tflops_per_s"] * 1e12 / r["images_per_s"] == pytest.approx(expected, rel=0.2)

    ckpt = run / "checkpoints" / f"step_{steps:08d}"
    rank_states = json.loads((ckpt / "rank_states.json").read_text())
    assert len(rank_states) == world
    for entry in rank_states:
        loader = entry["rank_state"]["loader"]
        assert loader["epoch"] == 0 and loader["batch_size"] == B
        # the position counts samples of all ranks: accum batches per rank per step
        assert loader["consumed"] == steps * accum * world * B
