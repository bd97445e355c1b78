"""A CLIP model as an ``open_clip/`` folder that open_clip loads as it is.

open_clip builds a DINOv2 image tower through timm (``vision_cfg.timm_model_name``, e.g.
``vit_small_patch14_dinov2``, ``timm_pool: token``, ``timm_proj: linear``) and its own causal
text tower, whose layout ours already is. The folder holds ``open_clip_config.json``
(``model_cfg`` + ``preprocess_cfg``) and ``open_clip_model.safetensors``; load it with::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR/open_clip")
    tokenizer = open_clip.get_tokenizer("local-dir:DIR/open_clip")

Limits of what open_clip expresses (each is reported in one line by :func:`unsupported_reason`):
its timm tower is built from the name alone, so only the released DINOv2 sizes (ViT-S/B/L/g/14,
with LayerScale, 0 or 4 registers, RGB) at timm's native 518 px fit — the position embedding is
resampled (bicubic, as our model does at run time) to the 37x37 grid, and the exported tower
runs at 518 px; a CLS ⊕ mean-patch pooling, or a LiT tower with extra blocks on a locked
backbone, has no open_clip form.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from dinosys.export.convert import TIMM_ARCH, create_timm_model, to_timm_state_dict
from dinosys.models.clip import CLIPModel, TrainedImageTower
from dinosys.models.vit import ARCHS, REGISTER_SUFFIX

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TIMM_IMG_SIZE = 518  # timm's DINOv2 models are built at 518 px when only the name is given


def unsupported_reason(model: CLIPModel) -> str | None:
    """None if open_clip can express ``model``; otherwise why not, in one line."""
    visual = model.visual
    if not isinstance(visual, TrainedImageTower):
        return ("open_clip cannot express a LiT image tower (trainable blocks on a locked "
                "backbone with cls ⊕ mean-patch pooling); use the native export")
    if visual.pool != "cls":
        return "open_clip's timm tower pools the class token only; this model pools cls ⊕ mean"
    cfg = visual.backbone.cfg
    base = cfg.arch.removesuffix(REGISTER_SUFFIX)
    if base not in TIMM_ARCH:
        return (f"open_clip builds timm DINOv2 towers by name only: ViT-S/B/L/g/14; "
                f"{cfg.arch} has no timm name")
    dim, depth, heads, patch, ffn = ARCHS[base]
    if (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.ffn) != (
            dim, depth, heads, patch, ffn):
        return f"open_clip builds timm DINOv2 towers by name only: a resized {cfg.arch} has none"
    if cfg.num_registers not in (0, 4) or cfg.in_chans != 3 or not cfg.layerscale_init:
        return ("open_clip's timm DINOv2 towers have LayerScale, 3 input channels and 0 or 4 "
                "registers")
    return None


def open_clip_model_cfg(model: CLIPModel) -> dict:
    """open_clip's ``model_cfg`` for ``model`` (call :func:`unsupported_reason` first)."""
    backbone = model.image_backbone
    name, _ = _timm_name(model)
    text = model.cfg.text
    cfg: dict = {
        "embed_dim": model.cfg.embed_dim,
        "vision_cfg": {"timm_model_name": name, "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": "linear",
                       "image_size": TIMM_IMG_SIZE, "patch_size": backbone.patch_size},
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size,
                     "width": text.width, "heads": text.heads, "layers": text.layers,
                     "mlp_ratio": text.mlp_ratio},
    }
    if model.logit_bias is not None:
        cfg["init_logit_bias"] = float(model.logit_bias)
    return cfg


def _timm_name(model: CLIPModel) -> tuple[str, dict]:
    from dinosys.export.convert import timm_model_spec

    return timm_model_spec(model.image_backbone.cfg)


def open_clip_state_dict(model: CLIPModel) -> dict[str, Tensor]:
    """``model``'s weights under open_clip's names, the image position embedding resampled to
    timm's 518 px grid."""
    backbone = model.image_backbone
    grid = TIMM_IMG_SIZE // backbone.patch_size
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    with torch.no_grad():
        state["pos_embed"] = backbone.interpolate_pos_encoding(grid, grid).detach().clone()
    timm_cfg = replace(backbone.cfg, img_size=TIMM_IMG_SIZE)
    timm_state = to_timm_state_dict(state, create_timm_model(timm_cfg))
    out = {f"visual.trunk.{k}": v for k, v in timm_state.items()}
    out["visual.head.proj.weight"] = model.visual.proj.weight.detach().clone()
    for k, v in model.text.state_dict().items():
        out[k] = v.detach().clone()
    out["logit_scale"] = model.logit_scale.detach().clone().reshape(())
    if model.logit_bias is not None:
        out["logit_bias"] = model.logit_bias.detach().clone().reshape(())
    return out


def preprocess_cfg(mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """open_clip's ``preprocess_cfg``: resize the shorter side, centre crop, normalise."""
    return {"size": TIMM_IMG_SIZE, "mean": list(mean), "std": list(std),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def write_open_clip(model: CLIPModel, out_dir, mean: tuple[float, ...],  # type: ignore[no-untyped-def]
                    std: tuple[float, ...], verify: bool = True) -> dict:
    """Write ``out_dir/open_clip_config.json`` and the weights; UserError if not expressible.

    Returns ``{"path": ..., "max_abs_diff": ...}``; with ``verify`` the difference is measured
    by loading the folder back with open_clip when it is importable (else None).
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from dinosys.errors import UserError

    reason = unsupported_reason(model)
    if reason is not None:
        raise UserError(f"open_clip export: {reason}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": open_clip_model_cfg(model), "preprocess_cfg": preprocess_cfg(mean, std)}
    state = {k: v.contiguous() for k, v in open_clip_state_dict(model).items()}
    save_file(state, str(out_dir / OPEN_CLIP_WEIGHTS))
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    diff = verify_open_clip(model, out_dir) if verify else None
    return {"path": str(out_dir), "max_abs_diff": diff}


def load_open_clip(folder):  # type: ignore[no-untyped-def]
    """The open_clip model in ``folder`` (open_clip imported through dinosys.export.compat)."""
    from dinosys.export.compat import import_torchvision

    try:
        import_torchvision()
    except ImportError:
        pass
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess


def verify_open_clip(model: CLIPModel, folder) -> float | None:  # type: ignore[no-untyped-def]
    """Max |difference| of image and text embeddings, ours vs open_clip's load of ``folder``;
    None when open_clip is not installed."""
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:
        return None
    from dinosys.data.tokenizer import ClipTokenizer

    ref, _ = load_open_clip(folder)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, TIMM_IMG_SIZE, TIMM_IMG_SIZE, generator=g)
    tokens = ClipTokenizer(model.cfg.text.context_length)(["a photo of a cat", "a digit 7"])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ours_i, ours_t = model.encode_image(images), model.encode_text(tokens)
        ref_i, ref_t = ref.encode_image(images, normalize=True), ref.encode_text(tokens,
                                                                               normalize=True)
    model.train(was_training)
    return max(float((ours_i - ref_i).abs().max()), float((ours_t - ref_t).abs().max()))
