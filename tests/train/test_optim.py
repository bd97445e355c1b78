"""Parameter groups (layer-wise lr decay, weight-decay exclusions, patch-embed multiplier,
frozen last layer) and per-module gradient clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinosys.config import HeadConfig, OptimConfig
from dinosys.models import create_backbone
from dinosys.models.heads import build_heads
from dinosys.train.optim import (
    apply_schedule,
    build_optimizer,
    build_param_groups,
    clip_grad_per_module,
    zero_last_layer_grads,
)

DEPTH = 3


@pytest.fixture(scope="module")
def modules() -> dict[str, nn.Module]:
    backbone = create_backbone("vit_tiny", embed_dim=32, depth=DEPTH, num_heads=2)
    head, _ = build_heads(HeadConfig(n_prototypes=16, hidden_dim=32, bottleneck_dim=8), 32)
    return {"backbone": backbone, "dino_head": head}


def rules_by_name(groups: list[dict]) -> dict[str, dict]:
    return {name: g for g in groups for name in g["names"]}


def test_layerwise_decay_and_patch_embed(modules: dict[str, nn.Module]) -> None:
    cfg = OptimConfig(layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    rules = rules_by_name(build_param_groups(modules, DEPTH, cfg))
    top = DEPTH + 1
    assert rules["backbone.cls_token"]["lr_mult"] == pytest.approx(0.9 ** top)
    assert rules["backbone.pos_embed"]["lr_mult"] == pytest.approx(0.9 ** top)
    assert rules["backbone.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(0.9 ** top * 0.2)
    for i in range(DEPTH):
        assert rules[f"backbone.blocks.{i}.attn.qkv.weight"]["lr_mult"] == pytest.approx(
            0.9 ** (top - (i + 1)))
    assert rules["backbone.norm.weight"]["lr_mult"] == pytest.approx(1.0)
    head_names = [n for n in rules if n.startswith("dino_head.")]
    assert head_names and all(rules[n]["lr_mult"] == pytest.approx(1.0) for n in head_names)


def test_weight_decay_exclusions(modules: dict[str, nn.Module]) -> None:
    rules = rules_by_name(build_param_groups(modules, DEPTH, OptimConfig()))
    no_wd = ["backbone.cls_token", "backbone.pos_embed", "backbone.mask_token",
             "backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.norm1.weight",
             "backbone.blocks.0.ls1.gamma", "backbone.norm.bias"]
    for name in no_wd:
        assert rules[name]["wd_mult"] == 0.0, name
    for name in ("backbone.blocks.0.attn.qkv.weight", "backbone.blocks.1.mlp.fc1.weight",
                 "dino_head.last_layer.weight"):
        assert rules[name]["wd_mult"] == 1.0, name
    assert rules["dino_head.last_layer.weight"]["is_last_layer"]
    assert sum(g["is_last_layer"] for g in build_param_groups(modules, DEPTH, OptimConfig())) == 1


def test_schedule_applied_and_last_layer_frozen(modules: dict[str, nn.Module]) -> None:
    groups = build_param_groups(modules, DEPTH, OptimConfig())
    opt = build_optimizer(groups, OptimConfig())
    apply_schedule(opt, lr=1e-3, weight_decay=0.1, last_layer_frozen=True)
    for g in opt.param_groups:
        expected = 0.0 if g["is_last_layer"] else 1e-3 * g["lr_mult"]
        assert g["lr"] == pytest.approx(expected)
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_mult"])
    apply_schedule(opt, lr=1e-3, weight_decay=0.1, last_layer_frozen=False)
    assert all(g["lr"] > 0 for g in opt.param_groups)

    head = modules["dino_head"]
    for p in head.parameters():
        p.grad = torch.ones_like(p)
    zero_last_layer_grads([head])
    assert head.last_layer.weight.grad is None
    assert all(p.grad is not None for n, p in head.named_parameters() if "last_layer" not in n)


def test_clip_per_module() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    for p in a.parameters():
        p.grad = torch.full_like(p, 10.0)
    for p in b.parameters():
        p.grad = torch.full_like(p, 0.01)
    norms = {k: float(v) for k, v in clip_grad_per_module({"a": a, "b": b}, max_norm=1.0).items()}
    assert norms["a"] == pytest.approx(10.0 * (20 ** 0.5), rel=1e-4)
    after_a = torch.cat([p.grad.flatten() for p in a.parameters()]).norm()
    after_b = torch.cat([p.grad.flatten() for p in b.parameters()]).norm()
    assert after_a == pytest.approx(1.0, rel=1e-4)  # clipped on its own
    assert after_b == pytest.approx(norms["b"], rel=1e-6)  # untouched by a's large norm
