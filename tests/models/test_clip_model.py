"""CLIP models: trained and locked (LiT) image towers, what trains and what is saved."""

from __future__ import annotations

import pytest
import torch

from dinosys.data.tokenizer import get_tokenizer
from dinosys.errors import UserError
from dinosys.models import create_backbone
from dinosys.models.clip import (
    LOCKED_PREFIX,
    CLIPModel,
    ClipModelConfig,
    ImageTowerConfig,
)
from dinosys.models.text import TextConfig
from dinosys.models.vit import BackboneConfig

TINY = BackboneConfig(arch="vit_tiny", img_size=28, patch_size=14, embed_dim=32, depth=2,
                      num_heads=2, layerscale_init=None)
TEXT = TextConfig(width=32, layers=1, heads=2, context_length=16)


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(0))


def _tokens(n: int = 4) -> torch.Tensor:
    from dinosys.data.tokenizer import ClipTokenizer

    return ClipTokenizer(16)([f"a photo of the digit {i}" for i in range(n)])


def test_trained_tower_cls_pool_and_gradients():
    torch.manual_seed(0)
    model = CLIPModel(ClipModelConfig(embed_dim=16, image=ImageTowerConfig(backbone=TINY),
                                      text=TEXT))
    img, txt = model(_images(), _tokens())
    assert img.shape == txt.shape == (4, 16)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(4))
    (img @ txt.T).sum().backward()
    assert model.visual.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert model.text.text_projection.grad is not None
    assert model.config_dict()["image"]["pool"] == "cls"
    assert get_tokenizer().context_length == 77


def test_locked_tower_is_frozen_unsaved_and_follows_casts():
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny", **{k: v for k, v in vars(TINY).items()
                                              if k not in ("arch",)})
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    cfg = ClipModelConfig(embed_dim=16, text=TEXT,
                          image=ImageTowerConfig(locked="unused-here", trainable_blocks=1))
    model = CLIPModel(cfg, backbone)
    names = [n for n, _ in model.named_parameters()]
    assert not any("locked" in n for n in names) and "visual.blocks.0.attn.qkv.weight" in names
    assert not any(k.startswith("visual.locked") for k in model.state_dict())
    full = model.export_state_dict()
    assert {k[len(LOCKED_PREFIX):] for k in full if k.startswith(LOCKED_PREFIX)} == set(before)
    assert model.visual.proj.in_features == 2 * 32  # cls ⊕ mean patch
    model.train()
    assert model.visual.training and not model.visual.locked.training
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    img, txt = model(_images(), _tokens())
    (1 - (img * txt).sum(1)).mean().backward()
    assert all(p.grad is None for p in backbone.parameters())
    opt.step()
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())
    assert not any(id(p) in {id(q) for q in backbone.parameters()}
                   for g in opt.param_groups for p in g["params"])
    model.double()
    assert backbone.pos_embed.dtype == torch.float64
    out = model.encode_image(_images().double())
    assert out.dtype == torch.float64


def test_locked_needs_a_backbone():
    cfg = ClipModelConfig(image=ImageTowerConfig(locked="some/run"), text=TEXT)
    with pytest.raises(UserError, match="build_clip_model"):
        CLIPModel(cfg)
    with pytest.raises(UserError):
        ImageTowerConfig(pool="avg")
