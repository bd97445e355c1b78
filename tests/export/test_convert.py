"""Our weights load into timm and Hugging Face DINOv2 models and give the same features."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dinosys.errors import UserError
from dinosys.export import convert
from dinosys.models import backbone_from_config, create_backbone

TOL = dict(atol=1e-5, rtol=1e-5)


def _features(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("arch,timm_name", [("vits14", "vit_small_patch14_dinov2"),
                                            ("vits14_reg", "vit_small_patch14_reg4_dinov2")])
def test_vits14_matches_timm_at_native_grid(arch, timm_name, timm_module, randomized):
    from timm.models.vision_transformer import checkpoint_filter_fn

    ours = randomized(arch)
    x = torch.randn(2, 3, 224, 224)
    ref = _features(ours, x)
    tm = timm_module.create_model(timm_name, pretrained=False, img_size=224, num_classes=0).eval()
    assert convert.timm_model_spec(ours.cfg)[0] == timm_name
    tm.load_state_dict(checkpoint_filter_fn(dict(ours.state_dict()), tm), strict=True)
    with torch.no_grad():
        feats = tm.forward_features(x)
    torch.testing.assert_close(feats[:, 0], ref["x_norm_clstoken"], **TOL)
    torch.testing.assert_close(feats[:, tm.num_prefix_tokens:], ref["x_norm_patchtokens"], **TOL)
    if ours.num_register_tokens:
        torch.testing.assert_close(feats[:, 1:5], ref["x_norm_regtokens"], **TOL)
    # and back: timm -> ours gives the same model
    back = create_backbone(arch).eval()
    convert.load_state_dict_strict(back, convert.from_timm_state_dict(tm.state_dict(), back.cfg))
    torch.testing.assert_close(_features(back, x)["x_prenorm"], ref["x_prenorm"], **TOL)


@pytest.mark.parametrize("kw", [dict(ffn="swiglu"), dict(layerscale_init=None), {}])
def test_tiny_variants_round_trip_through_timm(kw, timm_module, randomized):
    ours = randomized("vit_tiny_reg", **kw)
    x = torch.randn(3, 3, 28, 28)
    ref = _features(ours, x)
    tm = convert.load_into_timm(ours.state_dict(), convert.create_timm_model(ours.cfg).eval())
    with torch.no_grad():
        feats = tm.forward_features(x)
    torch.testing.assert_close(feats[:, 0], ref["x_norm_clstoken"], **TOL)
    torch.testing.assert_close(feats[:, 5:], ref["x_norm_patchtokens"], **TOL)
    back = create_backbone("vit_tiny_reg", **kw).eval()
    convert.load_state_dict_strict(back, convert.from_timm_state_dict(tm.state_dict(), back.cfg))
    torch.testing.assert_close(_features(back, x)["x_prenorm"], ref["x_prenorm"], **TOL)


def _save_hf_dir(model, path):
    path.mkdir(parents=True, exist_ok=True)
    save_file(convert.to_hf_state_dict(model.state_dict(), model.cfg), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(convert.hf_config_dict(model.cfg)))
    return path


@pytest.mark.parametrize("arch,kw,hf_class", [
    ("vits14", {}, "Dinov2Model"),
    ("vit_tiny_reg", dict(ffn="swiglu"), "Dinov2WithRegistersModel"),
])
def test_matches_hugging_face_both_ways(arch, kw, hf_class, tmp_path, transformers_module,
                                        randomized):
    ours = randomized(arch, **kw)
    s = ours.cfg.img_size
    x = torch.randn(2, 3, s, s)
    ref = _features(ours, x)
    keys = convert.to_hf_state_dict(ours.state_dict(), ours.cfg)
    assert "encoder.layer.0.attention.attention.query.weight" in keys  # 4.x names
    hf = getattr(transformers_module, hf_class).from_pretrained(_save_hf_dir(ours, tmp_path)).eval()
    with torch.no_grad():
        hidden = hf(pixel_values=x).last_hidden_state
    r = ours.num_register_tokens
    torch.testing.assert_close(hidden[:, 0], ref["x_norm_clstoken"], **TOL)
    torch.testing.assert_close(hidden[:, 1 + r:], ref["x_norm_patchtokens"], **TOL)
    # HF -> ours from the live HF model (transformers 5 names: q_proj, gate_proj, ...)
    cfg = convert.config_from_hf(hf.config)
    assert (cfg.embed_dim, cfg.depth, cfg.num_registers, cfg.ffn) == (
        ours.cfg.embed_dim, ours.cfg.depth, r, ours.cfg.ffn)
    back = backbone_from_config(cfg).eval()
    convert.load_state_dict_strict(back, convert.from_hf_state_dict(hf.state_dict(), cfg))
    torch.testing.assert_close(_features(back, x)["x_prenorm"], ref["x_prenorm"], **TOL)
    # ... and from the 4.x-named file
    again = backbone_from_config(cfg).eval()
    convert.load_state_dict_strict(again, convert.from_hf_state_dict(keys, cfg))
    torch.testing.assert_close(again.state_dict()["blocks.0.attn.qkv.weight"],
                               ours.state_dict()["blocks.0.attn.qkv.weight"])


def test_hf_random_model_converts_to_ours(transformers_module):
    """A model that starts on the HF side (its own init) gives the same features in ours."""
    tf = transformers_module
    torch.manual_seed(3)
    hf = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
        patch_size=4, layerscale_value=0.7)).eval()
    cfg = convert.config_from_hf(hf.config)
    ours = backbone_from_config(cfg).eval()
    convert.load_state_dict_strict(ours, convert.from_hf_state_dict(hf.state_dict(), cfg))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        hidden = hf(pixel_values=x).last_hidden_state
    torch.testing.assert_close(_features(ours, x)["x_norm_patchtokens"], hidden[:, 5:], **TOL)


def test_strict_loading_lists_missing_and_unexpected_keys():
    model = create_backbone("vit_tiny", depth=2)
    state = dict(model.state_dict())
    state.pop("blocks.1.attn.qkv.weight")
    state["blocks.7.attn.qkv.weight"] = torch.zeros(1)
    state["norm.weight"] = torch.zeros(5)
    with pytest.raises(UserError) as err:
        convert.load_state_dict_strict(model, state)
    msg = str(err.value)
    assert "missing keys: blocks.1.attn.qkv.weight" in msg
    assert "unexpected keys: blocks.7.attn.qkv.weight" in msg
    assert "norm.weight (5,) vs (192,)" in msg
    before = model.state_dict()["blocks.0.attn.qkv.weight"].clone()
    torch.testing.assert_close(model.state_dict()["blocks.0.attn.qkv.weight"], before)
