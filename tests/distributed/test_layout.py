"""One device: no FSDP2, and activation checkpointing only when the step would not fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dinosys.config import load_config
from dinosys.distributed.env import DistEnv
from dinosys.distributed.layout import (
    apply_single_device_layout,
    choose_single_device_layout,
    estimate_step_memory_gib,
)
from dinosys.train.tasks.ssl import SSLConfig

GPU = DistEnv(device=torch.device("cuda"))  # never touched: the memory is passed in


def test_vitg14_recipe_drops_checkpointing_on_an_h200_not_on_a_40gb_card() -> None:
    cfg = load_config(SSLConfig, "vitg14", [], kind="train")
    assert cfg.dist.activation_checkpointing  # the recipe asks for it (built for 256 GPUs)
    big = choose_single_device_layout(cfg, GPU, device_memory_gib=139.0)
    assert (big.fsdp, big.activation_checkpointing) == (False, False)
    assert "without activation checkpointing" in big.reason
    small = choose_single_device_layout(cfg, GPU, device_memory_gib=40.0)
    assert (small.fsdp, small.activation_checkpointing) == (False, True)
    assert small.estimate_gib < 0.85 * 40 < estimate_step_memory_gib(cfg, False)


def test_estimate_close_to_a_measured_peak() -> None:
    """ViT-L/14, batch 32, 65,536 prototypes, no drop path: 34.9 GiB peak on an H100."""
    cfg = load_config(SSLConfig, None, ["model.arch=vitl14", "data.batch_size_per_gpu=32"],
                      kind="train")
    assert estimate_step_memory_gib(cfg, False) == pytest.approx(34.9, rel=0.1)


def test_several_ranks_and_cpu_keep_the_config() -> None:
    cfg = load_config(SSLConfig, "vitg14", [], kind="train")
    ranks = dataclasses.replace(GPU, world_size=8)
    assert choose_single_device_layout(cfg, ranks, 139.0).activation_checkpointing
    cpu_cfg, layout = apply_single_device_layout(cfg, DistEnv())
    assert layout.activation_checkpointing and cpu_cfg.dist.activation_checkpointing
    assert not cpu_cfg.dist.fsdp
