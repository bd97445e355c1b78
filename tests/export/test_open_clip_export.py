"""The open_clip/ folder: open_clip loads it as it is, embeddings equal ours to 1e-5."""

from __future__ import annotations

import json

import pytest
import torch

from dinosys.data.tokenizer import ClipTokenizer
from dinosys.errors import UserError
from dinosys.eval.images import IMAGENET_MEAN, IMAGENET_STD
from dinosys.export.open_clip import (
    OPEN_CLIP_CONFIG,
    load_open_clip,
    unsupported_reason,
    write_open_clip,
)
from dinosys.models import create_backbone
from dinosys.models.clip import CLIPModel, ClipModelConfig, ImageTowerConfig
from dinosys.models.text import TextConfig
from dinosys.models.vit import BackboneConfig

TEXT = TextConfig(width=64, layers=2, heads=4)


@pytest.mark.parametrize("arch,bias", [pytest.param("vits14", None, marks=pytest.mark.slow),
                                       ("vits14_reg", -10.0)])
def test_open_clip_loads_the_folder_and_matches(tmp_path, arch, bias):
    torch.manual_seed(0)
    cfg = ClipModelConfig(embed_dim=32, text=TEXT, init_logit_bias=bias,
                          image=ImageTowerConfig(backbone=BackboneConfig(arch=arch, img_size=28)))
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial values everywhere (zeros would hide mapping errors)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    result = write_open_clip(model, tmp_path / "open_clip", IMAGENET_MEAN, IMAGENET_STD)
    assert result["max_abs_diff"] is not None and result["max_abs_diff"] < 1e-5
    ref, preprocess = load_open_clip(tmp_path / "open_clip")
    assert ref.logit_scale.item() == pytest.approx(model.logit_scale.item())
    if bias is not None:
        assert ref.logit_bias.item() == pytest.approx(model.logit_bias.item())
    config = json.loads((tmp_path / "open_clip" / OPEN_CLIP_CONFIG).read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_pool"] == "token"
    x = torch.randn(2, 3, 518, 518)
    with torch.no_grad():
        torch.testing.assert_close(ref.encode_image(x, normalize=True), model.encode_image(x),
                                   atol=1e-5, rtol=0)
    # the tokenizer the model card names gives our tokens (long texts cut, end-of-text kept)
    import open_clip

    texts = ["a photo of a cat", "Ünïcødé, punctuation!? " * 40]
    theirs = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'open_clip'}")(texts)
    ours = ClipTokenizer(TEXT.context_length)(texts)
    assert torch.equal(theirs, ours) and int(ours[1, -1]) == 49407
    with torch.no_grad():
        torch.testing.assert_close(ref.encode_text(theirs, normalize=True),
                                   model.encode_text(ours), atol=1e-5, rtol=0)


def test_inexpressible_towers_say_why(tmp_path):
    tiny = BackboneConfig(arch="vit_tiny", img_size=28, depth=1, embed_dim=32, num_heads=2)
    model = CLIPModel(ClipModelConfig(embed_dim=8, text=TEXT,
                                      image=ImageTowerConfig(backbone=tiny)))
    assert "no timm name" in unsupported_reason(model)
    with pytest.raises(UserError, match="open_clip export: .*timm"):
        write_open_clip(model, tmp_path / "o", IMAGENET_MEAN, IMAGENET_STD)
    assert not (tmp_path / "o").exists()
    backbone = create_backbone("vit_tiny", depth=1, embed_dim=32, num_heads=2)
    lit = CLIPModel(ClipModelConfig(embed_dim=8, text=TEXT,
                                    image=ImageTowerConfig(locked="x", trainable_blocks=1)),
                    backbone)
    assert "LiT" in unsupported_reason(lit)
