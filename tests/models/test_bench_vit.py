"""tools/bench_vit.py runs on CPU, prints a table and ends with one JSON object."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from dinosys.models import backbone_train_flops, create_backbone
from dinosys.models.flops import group_train_flops

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_vit.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_vit", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_cpu_table_and_json(capsys):
    bench = _load_bench()
    rc = bench.main(["--arch", "vit_tiny", "--batch", "2", "--img-size", "28", "--steps", "1",
                     "--warmup", "0", "--backends", "sdpa,math,xformers", "--device", "cpu",
                     "--peak-tflops", "1.0"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert any(line.startswith("arch") and "img_per_s" in line for line in lines[:-1])
    rows = {r["backend"]: r for r in summary["results"]}
    assert rows["sdpa"]["status"] == "ok" and rows["math"]["status"] == "ok"
    assert rows["xformers"]["status"].startswith("skipped: xformers")
    sdpa = rows["sdpa"]
    flops = backbone_train_flops(create_backbone("vit_tiny"), 28) * 2
    assert abs(sdpa["gflop_per_step"] - flops / 1e9) < 1e-6
    assert abs(sdpa["tflops"] * sdpa["step_ms"] / 1e3 * 1e12 - flops) / flops < 1e-6
    assert abs(sdpa["mfu"] - sdpa["tflops"] / 1.0) < 1e-12
    assert sdpa["img_per_s"] > 0 and sdpa["speedup_vs_sdpa"] == 1.0


def test_multicrop_inputs_follow_dinov2():
    bench = _load_bench()
    inputs = bench.make_inputs(3, 0, True, torch.device("meta"))
    assert [(s, tuple(x.shape)) for s, x in inputs] == [(224, (6, 3, 224, 224)),
                                                        (98, (24, 3, 98, 98))]


def test_packed_checkpointed_drop_path_with_timm_baseline(capsys):
    """MFU counts the model's FLOPs (drop path subsets, no recompute); hw_util adds the
    recompute; the timm row runs the same crops and every row gets its ratio to it."""
    bench = _load_bench()
    rc = bench.main(["--arch", "vits14", "--batch", "4", "--img-size", "28", "--steps", "1",
                     "--warmup", "0", "--backends", "sdpa", "--device", "cpu", "--pack",
                     "--activation-checkpointing", "--drop-path", "0.4", "--timm-baseline",
                     "--peak-tflops", "1.0"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["backend"]: r for r in summary["results"]}
    sdpa, timm = rows["sdpa"], rows["timm"]
    model = create_backbone("vits14", drop_path_rate=0.4)
    assert abs(sdpa["gflop_per_step"] - group_train_flops(model, 28, 4) / 1e9) < 1e-6
    ratio = group_train_flops(model, 28, 4, True) / group_train_flops(model, 28, 4)
    assert abs(sdpa["hw_util"] / sdpa["mfu"] - ratio) < 1e-9 and ratio > 1.2
    assert timm["status"] == "ok" and timm["timm_model"] == "vit_small_patch14_dinov2"
    assert abs(sdpa["vs_timm"] - sdpa["img_per_s"] / timm["img_per_s"]) < 1e-9
