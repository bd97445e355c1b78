"""Analytic FLOPs against torch's own count (torch.utils.flop_counter) on the meta device."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dinosys.config import load_config
from dinosys.models import backbone_from_config
from dinosys.models.flops import backbone_forward_flops, group_train_flops
from dinosys.models.vit import BackboneConfig
from dinosys.train.metrics import known_peak_tflops, matmul_dtype
from dinosys.train.tasks.ssl import SSLConfig


def counted_train_flops(cfg: BackboneConfig, groups: list[tuple[int, int]]) -> float:
    """FLOPs torch counts for one training forward + backward over (size, n) crop groups."""
    with torch.device("meta"):
        model = backbone_from_config(cfg).train()
        crops = [torch.randn(n, cfg.in_chans, s, s) for s, n in groups]
    with FlopCounterMode(display=False) as counter:
        outs = model(crops)
        loss = sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].sum() for o in outs)
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("recipe", ["vitl14", "vitg14"])
def test_recipe_step_flops_match_torch_count(recipe: str) -> None:
    """The L/g recipes run drop path 0.4: each branch computes floor(0.6 B) samples per group."""
    cfg = load_config(SSLConfig, recipe, [], kind="train").model
    assert cfg.drop_path_rate > 0.1
    b = 5  # 2b = 10 globals -> 6 samples per branch, 8b = 40 locals -> 24
    groups = [(224, 2 * b), (98, 8 * b)]
    want = sum(group_train_flops(cfg, s, n) for s, n in groups)
    assert counted_train_flops(cfg, groups) == pytest.approx(want, rel=1e-9)
    # counting every sample would overstate the recipe's work by about 1/0.6
    full = sum(3 * backbone_forward_flops(cfg, s) * n for s, n in groups)
    assert 1.5 < full / want < 1.7


@pytest.mark.parametrize("rate,uniform", [(0.0, True), (0.1, True), (0.3, False)])
def test_small_model_flops_match_torch_count(rate: float, uniform: bool) -> None:
    """No drop path, per-sample drop path (computes all samples), and a linear rate ramp
    (blocks below 0.1 compute everything, the rest a subset)."""
    cfg = BackboneConfig(arch="vits14", depth=4, drop_path_rate=rate, drop_path_uniform=uniform)
    groups = [(56, 6), (28, 9)]
    want = sum(group_train_flops(cfg, s, n) for s, n in groups)
    assert counted_train_flops(cfg, groups) == pytest.approx(want, rel=1e-9)


def test_peak_table_is_exact_by_name_and_dtype() -> None:
    assert known_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert known_peak_tflops("NVIDIA H200", "bf16") == pytest.approx(989.4)
    assert known_peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5)
    assert known_peak_tflops("NVIDIA H100 NVL", "bf16") == pytest.approx(835.5)
    assert known_peak_tflops("NVIDIA H100 SXM-like future part", "bf16") is None
    assert known_peak_tflops("NVIDIA H200", matmul_dtype("fp32")) in (66.9, 494.7)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert known_peak_tflops("NVIDIA H200", "fp32") == pytest.approx(66.9)
        torch.set_float32_matmul_precision("high")
        assert known_peak_tflops("NVIDIA H200", "fp32") == pytest.approx(494.7)
    finally:
        torch.set_float32_matmul_precision(prev)
