"""Parameter groups (layer-wise lr decay declared by the model, weight-decay exclusions,
patch-embed multiplier) and per-module gradient clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinosys.models import create_backbone
from dinosys.models.heads import HeadConfig, build_heads
from dinosys.train.optim import (
    OptimConfig,
    apply_schedule,
    build_optimizer,
    build_param_groups,
    clip_grad_per_module,
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
    rules = rules_by_name(build_param_groups(modules, cfg))
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
    rules = rules_by_name(build_param_groups(modules, OptimConfig()))
    no_wd = ["backbone.cls_token", "backbone.pos_embed", "backbone.mask_token",
             "backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.norm1.weight",
             "backbone.blocks.0.ls1.gamma", "backbone.norm.bias"]
    for name in no_wd:
        assert rules[name]["wd_mult"] == 0.0, name
    for name in ("backbone.blocks.0.attn.qkv.weight", "backbone.blocks.1.mlp.fc1.weight",
                 "dino_head.last_layer.weight"):
        assert rules[name]["wd_mult"] == 1.0, name


def test_schedule_applied(modules: dict[str, nn.Module]) -> None:
    groups = build_param_groups(modules, OptimConfig())
    opt = build_optimizer(groups, OptimConfig())
    apply_schedule(opt, lr=1e-3, weight_decay=0.1)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_mult"])
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_mult"])


def test_layers_come_from_the_model() -> None:
    """A module without ``num_layers``/``layer_id`` is a head at the top layer; a module that
    declares its layers gets layer-wise decay by its own rule, whatever its key is called."""

    class TwoLayers(nn.Module):
        num_layers = 3

        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(2, 2), nn.Linear(2, 2)

        def layer_id(self, name: str) -> int:
            return 1 if name.startswith("first") else 2

    rules = rules_by_name(build_param_groups({"tower": TwoLayers(), "proj": nn.Linear(2, 2)},
                                             OptimConfig(layerwise_decay=0.5)))
    assert rules["tower.first.weight"]["lr_mult"] == pytest.approx(0.5)
    assert rules["tower.second.weight"]["lr_mult"] == pytest.approx(1.0)
    assert rules["proj.weight"]["lr_mult"] == pytest.approx(1.0)


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
