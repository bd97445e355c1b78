"""The image tower of a CLIP model exported alone (timm / HF / ONNX, projection included): each
loads as its model card says and gives ``encode_image`` to 1e-5; what a format cannot express
is a one-line error and nothing is written."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dinosys.errors import UserError
from dinosys.export.clip_image import hf_image_embeds
from dinosys.export.exporter import export_model
from dinosys.models import create_backbone
from dinosys.models.clip import CLIPModel, ClipModelConfig, ImageTowerConfig
from dinosys.models.text import TextConfig
from dinosys.models.vit import BackboneConfig

TEXT = TextConfig(width=32, layers=1, heads=2, context_length=16)


def _perturbed(model: CLIPModel) -> CLIPModel:
    with torch.no_grad():  # non-trivial values everywhere (zeros would hide mapping errors)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _trained(pool: str, registers: int) -> CLIPModel:
    torch.manual_seed(0)
    backbone = BackboneConfig(arch="vit_tiny", img_size=28, patch_size=14, depth=2,
                              embed_dim=32, num_heads=2, num_registers=registers)
    return _perturbed(CLIPModel(ClipModelConfig(
        embed_dim=16, text=TEXT, image=ImageTowerConfig(backbone=backbone, pool=pool))))


def _lit() -> CLIPModel:
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny", img_size=28, patch_size=14, depth=2, embed_dim=32,
                               num_heads=2)
    return _perturbed(CLIPModel(ClipModelConfig(
        embed_dim=16, text=TEXT, image=ImageTowerConfig(locked="x", trainable_blocks=1)),
        backbone))


def _images() -> torch.Tensor:
    return torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def test_trained_tower_timm_hf_onnx(tmp_path, timm_module, transformers_module):
    model = _trained("cls", registers=4)
    summary = export_model(model, tmp_path / "e", ["timm", "hf", "onnx"])
    for fmt in ("timm", "hf", "onnx"):
        assert summary["checks"][fmt]["max_abs_diff"] < 1e-5, fmt
    x = _images()
    with torch.no_grad():
        ref = model.encode_image(x)
        timm_model = timm_module.create_model(f"local-dir:{tmp_path / 'e' / 'timm'}",
                                              pretrained=True).eval()
        torch.testing.assert_close(F.normalize(timm_model(x), dim=-1), ref, atol=1e-5, rtol=0)
        hf = transformers_module.AutoModel.from_pretrained(str(tmp_path / "e" / "hf")).eval()
        torch.testing.assert_close(hf_image_embeds(hf, tmp_path / "e" / "hf", x), ref,
                                   atol=1e-5, rtol=0)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "e" / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (emb,) = session.run(["image_embeds"], {"pixel_values": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(emb), ref, atol=1e-5, rtol=0)
    readme = (tmp_path / "e" / "README.md").read_text()
    assert "image_projection.safetensors" in readme and "image_embeds" in readme


def test_cls_mean_pooling_in_hf_and_lit_in_onnx(tmp_path, transformers_module):
    model = _trained("cls_mean", registers=0)
    summary = export_model(model, tmp_path / "mean", ["hf", "onnx"])
    assert max(summary["checks"][f]["max_abs_diff"] for f in ("hf", "onnx")) < 1e-5
    spec = json.loads((tmp_path / "mean" / "hf" / "image_projection.json").read_text())
    assert spec["pool"] == "cls_mean"
    lit = _lit()
    summary = export_model(lit, tmp_path / "lit", ["onnx"])
    assert summary["checks"]["onnx"]["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("which,fmt,match", [
    ("lit", "timm", "LiT image tower .* no timm form"),
    ("lit", "hf", "LiT image tower .* no hf form"),
    ("cls_mean", "timm", "timm's head pools one token"),
])
def test_inexpressible_towers_say_why_and_write_nothing(tmp_path, which, fmt, match):
    model = _lit() if which == "lit" else _trained("cls_mean", registers=0)
    with pytest.raises(UserError, match=match) as info:
        export_model(model, tmp_path / "x", [fmt])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()
