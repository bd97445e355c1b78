"""The DINOv2 ViT family: shapes, multi-crop forward, masks, registers, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from dinosys.errors import ConfigError, UserError
from dinosys.models import (
    backbone_forward_flops,
    backbone_from_config,
    create_backbone,
)
from dinosys.models.vit import BackboneConfig

KEYS = {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def tiny_reg() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("vit_tiny_reg").eval()


def test_single_batch_contract(tiny_reg):
    out = tiny_reg(torch.randn(3, 3, 28, 28))
    assert set(out) == KEYS
    assert out["x_norm_clstoken"].shape == (3, 192)
    assert out["x_norm_regtokens"].shape == (3, 4, 192)
    assert out["x_norm_patchtokens"].shape == (3, 49, 192)
    assert out["x_prenorm"].shape == (3, 1 + 4 + 49, 192)
    assert out["masks"] is None
    normed = tiny_reg.norm(out["x_prenorm"])
    torch.testing.assert_close(normed[:, 0], out["x_norm_clstoken"])


def test_crop_list_equals_separate_forwards(tiny_reg):
    """Grouping same-size crops (and running sizes together) must not change any output."""
    torch.manual_seed(1)
    crops = [torch.randn(2, 3, 28, 28), torch.randn(5, 3, 12, 12), torch.randn(3, 3, 28, 28)]
    masks = [torch.rand(2, 49) < 0.4, None, torch.rand(3, 49) < 0.4]
    together = tiny_reg(crops, masks)
    assert len(together) == 3
    for crop, mask, out in zip(crops, masks, together):
        alone = tiny_reg(crop, mask)
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(out[key], alone[key], atol=1e-5, rtol=1e-5)
        assert out["masks"] is mask
    assert together[1]["x_norm_patchtokens"].shape == (5, 9, 192)


def test_masked_patches_use_the_mask_token(tiny_reg):
    x = torch.randn(2, 3, 28, 28)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[0, :10] = True
    with torch.no_grad():
        tiny_reg.mask_token.normal_()
        tokens = tiny_reg.prepare_tokens(x, mask)
        plain = tiny_reg.prepare_tokens(x)
    r = 1 + tiny_reg.num_register_tokens
    pos = tiny_reg.pos_embed[:, 1:]
    torch.testing.assert_close(tokens[0, r : r + 10], (tiny_reg.mask_token + pos[0, :10]).detach())
    torch.testing.assert_close(tokens[1], plain[1])
    torch.testing.assert_close(tokens[0, r + 10 :], plain[0, r + 10 :])
    # the masked image's features change, the other image's do not
    out_m, out_p = tiny_reg(x, mask), tiny_reg(x)
    assert not torch.allclose(out_m["x_norm_clstoken"][0], out_p["x_norm_clstoken"][0])
    torch.testing.assert_close(out_m["x_norm_clstoken"][1], out_p["x_norm_clstoken"][1])


def test_registers_sit_between_cls_and_patches_without_pos_embed(tiny_reg):
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        tokens = tiny_reg.prepare_tokens(x)
    torch.testing.assert_close(tokens[0, 1:5], tiny_reg.register_tokens[0].detach())
    torch.testing.assert_close(tokens[0, 0], (tiny_reg.cls_token + tiny_reg.pos_embed[:, 0])[0, 0]
                               .detach())


def test_pos_embed_interpolation_to_other_grids(tiny_reg):
    pos = tiny_reg.interpolate_pos_encoding(7, 7)
    assert pos is tiny_reg.pos_embed
    other = tiny_reg.interpolate_pos_encoding(5, 9)
    assert other.shape == (1, 1 + 45, 192)
    torch.testing.assert_close(other[:, 0], tiny_reg.pos_embed[:, 0])
    out = tiny_reg(torch.randn(2, 3, 20, 36))
    assert out["x_norm_patchtokens"].shape == (2, 45, 192)
    assert torch.isfinite(out["x_prenorm"]).all()


def test_intermediate_layers(tiny_reg):
    x = torch.randn(2, 3, 28, 28)
    last = tiny_reg.get_intermediate_layers(x, 1)
    torch.testing.assert_close(last[0], tiny_reg(x)["x_norm_patchtokens"])
    four = tiny_reg.get_intermediate_layers(x, 4, reshape=True, return_class_token=True)
    assert len(four) == 4
    patches, cls = four[0]
    assert patches.shape == (2, 192, 7, 7) and cls.shape == (2, 192)
    chosen = tiny_reg.get_intermediate_layers(x, [0, 5], norm=False)
    assert len(chosen) == 2 and chosen[1].shape == (2, 49, 192)
    torch.testing.assert_close(chosen[1], tiny_reg(x)["x_prenorm"][:, 5:])
    with pytest.raises(UserError):
        tiny_reg.get_intermediate_layers(x, [6])


def test_vit_tiny_patch_is_configurable():
    m = create_backbone("vit_tiny", patch_size=7)
    assert m.patch_size == 7 and m.pos_embed.shape == (1, 1 + 16, 192)
    assert m(torch.randn(1, 3, 28, 28))["x_norm_patchtokens"].shape == (1, 16, 192)


def test_bad_names_and_inputs():
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("vitx14")
    with pytest.raises(ConfigError, match="unknown option"):
        create_backbone("vit_tiny", embed_dims=3)
    with pytest.raises(ConfigError, match="attn_backend"):
        create_backbone("vit_tiny", attn_backend="flash")
    m = create_backbone("vit_tiny")
    with pytest.raises(UserError, match="bool tensor"):
        m(torch.randn(2, 3, 28, 28), torch.zeros(2, 48, dtype=torch.bool))
    with pytest.raises(UserError, match="masks"):
        m([torch.randn(2, 3, 28, 28)], [None, None])


# Exact parameter counts of the released layouts at img_size 224 (pos-embed 1 + 16*16 tokens):
# equal to timm's vit_*_patch14_dinov2 at 224 plus our mask token (timm drops it).
EXACT = {"vits14": 21_629_184, "vitb14": 85_725_696, "vitl14": 303_228_928,
         "vitg14": 1_134_771_200}
# docs/training.md (DINOv2) rounds: 21M, 86M, 300M, 1.1B.
TABLE = {"vits14": 21e6, "vitb14": 86e6, "vitl14": 300e6, "vitg14": 1.1e9}


@pytest.mark.parametrize("arch", sorted(EXACT))
def test_parameter_counts_on_meta_device(arch):
    with torch.device("meta"):
        model = create_backbone(arch)
        reg = create_backbone(arch + "_reg")
    n = _count(model)
    assert n == EXACT[arch]
    assert _count(reg) == n + 4 * model.embed_dim
    # the table's figures are rounded to 2 significant digits (paper); stay within that rounding
    assert abs(n - TABLE[arch]) / TABLE[arch] < 0.035
    if arch == "vitg14":
        blk = model.blocks[0]
        assert tuple(blk.mlp.w12.weight.shape) == (2 * 4096, 1536)
        assert tuple(blk.mlp.w3.weight.shape) == (1536, 4096)
        assert len(model.blocks) == 40


def test_flops_match_parameter_count_rule_of_thumb():
    """For matmul-dominated ViTs forward FLOPs ~ 2 * params * tokens (+ attention)."""
    cfg = BackboneConfig(arch="vitb14")
    flops = backbone_forward_flops(cfg, 224)
    n = 1 + 256
    block_params = EXACT["vitb14"] - 257 * 768 - (3 * 14 * 14 * 768 + 768) - 768 * 3
    approx = 2 * block_params * n + 12 * 4 * n * n * 768 + 2 * 256 * 588 * 768
    assert abs(flops - approx) / approx < 0.01
    assert 40e9 < flops < 50e9  # ViT-B/14 at 224: ~46 GFLOPs (23 GMACs)
    assert backbone_forward_flops(create_backbone("vit_tiny"), (28, 28)) > 0
    assert backbone_forward_flops(cfg, (224, 448)) > 2 * flops


def test_backbone_from_config_resolves_fields():
    model = backbone_from_config(BackboneConfig(arch="vit_tiny_reg", img_size=28, depth=2))
    assert model.cfg.embed_dim == 192 and model.cfg.depth == 2 and len(model.blocks) == 2
    assert model.cfg.num_registers == 4 and model.cfg.patch_size == 4
    assert model.cfg.ffn == "mlp"


def test_outputs_are_not_views_of_one_tensor():
    """FSDP2 warns on every rank when a sharded module returns a view (an in-place op on it
    would skip the module's pre-backward all-gather): every output is a tensor of its own."""
    model = create_backbone("vit_tiny")
    crops = [torch.randn(2, 3, 28, 28), torch.randn(2, 3, 28, 28), torch.randn(2, 3, 12, 12)]
    for out in model(crops, masks=[None] * 3) + [model(crops[0])]:
        for key, value in out.items():
            if torch.is_tensor(value):
                assert value._base is None, f"{key} is a view"


def _released_formula(pos: torch.Tensor, h: int, w: int, offset: float,
                      antialias: bool) -> torch.Tensor:
    """DINOv2's released interpolate_pos_encoding, written out: scale_factor=(n + offset) / M
    with an offset, an explicit size without."""
    side = int(math.sqrt(pos.shape[1] - 1))
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": ((h + offset) / side, (w + offset) / side)}
    else:
        kwargs = {"size": (h, w)}
    out = torch.nn.functional.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    return torch.cat([pos[:, :1], out.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


@pytest.mark.parametrize("arch, offset, antialias", [("vits14", 0.1, False),
                                                     ("vits14_reg", 0.0, True)])
def test_pos_embed_offset_follows_the_released_layout(arch: str, offset: float,
                                                      antialias: bool) -> None:
    """Non-register models resize with the +0.1 offset (released checkpoints' features depend
    on it), register models to an explicit size with antialias; both equal the formula."""
    torch.manual_seed(0)
    model = create_backbone(arch, img_size=518, depth=1)
    assert model.cfg.interpolate_offset == offset and model.interpolate_antialias == antialias
    pos = model.pos_embed.detach()
    for h, w in ((16, 16), (7, 7), (16, 9)):  # 224 px, 98 px local crops, a non-square grid
        got = model.interpolate_pos_encoding(h, w).detach()
        torch.testing.assert_close(got, _released_formula(pos, h, w, offset, antialias),
                                   rtol=0, atol=0)
    if offset:  # the offset matters: without it the 224 px embedding differs
        plain = _released_formula(pos, 16, 16, 0.0, antialias)
        assert (model.interpolate_pos_encoding(16, 16) - plain).abs().max() > 1e-4


def test_pos_embed_offset_is_configurable_and_exported(tmp_path) -> None:
    model = create_backbone("vits14", img_size=518, depth=1, interpolate_offset=0.0)
    assert model.cfg.interpolate_offset == 0.0
    from dinosys.export import load, save_native

    save_native(create_backbone("vit_tiny", depth=1), tmp_path / "tiny")
    assert load(tmp_path / "tiny").cfg.interpolate_offset == 0.1
