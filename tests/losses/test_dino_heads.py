"""DINOHead / build_heads: shapes, weight-normalised prototypes, init, last_layer freezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinosys.models.heads import DINOHead, HeadConfig, WeightNormLinear, build_heads


def _head(**kw) -> DINOHead:
    args = dict(in_dim=24, n_prototypes=50, hidden_dim=40, bottleneck_dim=16)
    args.update(kw)
    return DINOHead(**args)


def test_shapes_and_layer_layout():
    torch.manual_seed(0)
    head = _head()
    assert head(torch.randn(5, 24)).shape == (5, 50)
    assert head(torch.randn(2, 7, 24)).shape == (2, 7, 50)  # patch tokens
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 40), (40, 40), (40, 16)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert [(m.in_features, m.out_features) for m in _head(nlayers=1).mlp] == [(24, 16)]
    assert len([m for m in _head(nlayers=4).mlp if isinstance(m, nn.Linear)]) == 4


def test_weight_norm_last_layer_uses_unit_prototypes():
    torch.manual_seed(0)
    head = _head()
    assert isinstance(head.last_layer, WeightNormLinear)
    assert [n for n, _ in head.last_layer.named_parameters()] == ["weight"]
    norms = head.last_layer.normalized_weight().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(50))
    x = torch.randn(6, 24)
    z = head.bottleneck(x)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(6))
    w = head.last_layer.weight
    expected = z @ (w / w.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected)
    # g is fixed to 1: rescaling the raw rows changes nothing; logits are cosines in [-1, 1].
    with torch.no_grad():
        head.last_layer.weight.mul_(torch.rand(50, 1) * 10 + 0.1)
    torch.testing.assert_close(head(x), expected)
    assert head(x).abs().max() <= 1 + 1e-6


def test_linear_last_layer_is_plain_bias_free_linear():
    head = _head(last_layer="linear")
    assert type(head.last_layer) is nn.Linear and head.last_layer.bias is None
    x = torch.randn(3, 24)
    torch.testing.assert_close(head(x), head.bottleneck(x) @ head.last_layer.weight.T)


def test_init_trunc_normal_and_zero_bias():
    torch.manual_seed(0)
    head = DINOHead(256, 64, hidden_dim=512, bottleneck_dim=128)
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            assert abs(m.weight.std().item() - 0.02) < 0.002


def test_frozen_last_layer_gets_no_grad_but_mlp_does():
    head = _head()
    for p in head.last_layer.parameters():
        p.requires_grad_(False)
    head(torch.randn(4, 24)).logsumexp(-1).sum().backward()
    assert head.last_layer.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.mlp.parameters())


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="last_layer"):
        _head(last_layer="cosine")
    with pytest.raises(ValueError, match="n_prototypes"):
        _head(n_prototypes=0)


def test_build_heads_shared_and_separate():
    cfg = HeadConfig(n_prototypes=30, hidden_dim=20, bottleneck_dim=8)
    dino, ibot = build_heads(cfg, embed_dim=12)
    assert dino is ibot and dino.n_prototypes == 30 and dino.in_dim == 12

    cfg = HeadConfig(
        n_prototypes=30, hidden_dim=20, bottleneck_dim=8, last_layer="linear",
        ibot_separate_head=True, ibot_n_prototypes=40, ibot_hidden_dim=24, ibot_bottleneck_dim=6,
    )
    dino, ibot = build_heads(cfg, embed_dim=12)
    assert dino is not ibot
    assert ibot(torch.randn(2, 12)).shape == (2, 40)
    assert ibot.mlp[0].out_features == 24 and ibot.bottleneck_dim == 6
    assert type(ibot.last_layer) is nn.Linear and type(dino.last_layer) is nn.Linear
    assert not set(map(id, dino.parameters())) & set(map(id, ibot.parameters()))
