"""The ``vit_backbone`` model type: a DINOv2-style ViT backbone in an exported directory.

``config.json`` holds everything needed to rebuild and feed the model: the resolved
BackboneConfig (``architecture``), patch size, registers, embedding size, normalisation
mean/std and preprocessing; README.md is the model card.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, fields
from pathlib import Path

from torch import nn

from dinosys.config import ConfigError
from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.errors import UserError
from dinosys.export.native import FORMAT_NAMES, FORMAT_VERSION, provenance_markdown
from dinosys.export.registry import ModelType, register_model_type
from dinosys.models.vit import BackboneConfig, DinoVisionTransformer, backbone_from_config


def backbone_config(backbone: nn.Module, card: dict | None = None) -> dict:
    """The ``config.json`` content for ``backbone`` (a DinoVisionTransformer)."""
    card = card or {}
    cfg = backbone.cfg
    arch = asdict(cfg)
    arch["attn_backend"] = "auto"  # the exporting machine's backend says nothing about the user's
    mean = list(card.get("mean", IMAGENET_MEAN))
    std = list(card.get("std", IMAGENET_STD))
    return {
        "format": FORMAT_NAMES[0],
        "format_version": FORMAT_VERSION,
        "model_type": DinoVisionTransformer.model_type,
        "architecture": arch,
        "embed_dim": cfg.embed_dim,
        "patch_size": cfg.patch_size,
        "num_register_tokens": cfg.num_registers,
        "num_parameters": sum(p.numel() for p in backbone.parameters()),
        "normalization": {"mean": mean, "std": std},
        "preprocessing": {
            "resize_shorter_side": round(cfg.img_size * 256 / 224),
            "center_crop": cfg.img_size,
            "interpolation": "bicubic",
            "input_multiple_of": cfg.patch_size,
            "rescale": "pixels / 255, then (x - mean) / std",
        },
        "outputs": ["x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"],
    }


def backbone_card(config: dict, card: dict | None = None, formats: list[str] | None = None
                  ) -> str:
    """README.md text: architecture, preprocessing, how to load each format, card fields."""
    card = dict(card or {})
    arch = config["architecture"]
    name = card.pop("name", arch["arch"])
    lines = [
        f"# {name}", "",
        "A DINOv2-style vision transformer backbone exported by dinosys.", "",
        "## Architecture", "",
        "| field | value |", "|---|---|",
        f"| arch | {arch['arch']} |",
        f"| embed dim / depth / heads | {arch['embed_dim']} / {arch['depth']} / "
        f"{arch['num_heads']} |",
        f"| patch size | {arch['patch_size']} |",
        f"| registers | {arch['num_registers']} |",
        f"| FFN | {arch['ffn']} |",
        f"| position-embedding grid | {arch['img_size']} px |",
        f"| parameters | {config['num_parameters']:,} |", "",
        "## Preprocessing", "",
        f"Resize the shorter side to {config['preprocessing']['resize_shorter_side']} px "
        f"(bicubic), centre-crop {config['preprocessing']['center_crop']} px, scale to [0, 1], "
        f"normalise with mean {config['normalization']['mean']} and std "
        f"{config['normalization']['std']}. Any size that is a multiple of "
        f"{arch['patch_size']} works (the position embedding is interpolated).", "",
        "## Loading", "",
        "```python", "import dinosys.export", "",
        "model = dinosys.export.load('THIS_DIR')  # eval mode, CPU",
        "out = model(images)  # dict: x_norm_clstoken, x_norm_patchtokens, ...", "```",
    ]
    formats = formats or []
    if "timm" in formats:
        lines += ["", "timm: `timm.create_model('local-dir:THIS_DIR/timm', pretrained=True)`; "
                  "`forward_features` gives the normalised tokens (cls first)."]
    if "hf" in formats:
        lines += ["", "Hugging Face: `transformers.AutoModel.from_pretrained('THIS_DIR/hf')`; "
                  "`last_hidden_state[:, 0]` is the cls token."]
    if "timm" in formats or "hf" in formats:
        lines += ["", "If `import timm` or `import transformers` fails with `operator "
                  "torchvision::nms does not exist` (a torchvision build that does not match "
                  "torch, such as a CUDA torchvision beside a CPU torch), run "
                  "`import dinosys.export.compat` first."]
    if "onnx" in formats:
        lines += ["", "ONNX: `onnx/model.onnx`, input `pixel_values` (N, 3, H, W) at the "
                  "exported size, outputs `cls_token` (N, D) and `patch_tokens` (N, P, D)."]
    for section in ("data", "recipe", "evaluation"):
        if section in card:
            lines += ["", f"## {section.capitalize()}", "", _as_markdown(card.pop(section))]
    if card.get("provenance"):
        lines += ["", "## Provenance", "", provenance_markdown(card.pop("provenance"))]
    card.pop("mean", None)
    card.pop("std", None)
    if card:
        lines += ["", "## Details", "", _as_markdown(card)]
    return "\n".join(lines) + "\n"


def _as_markdown(value: object) -> str:
    if isinstance(value, dict):
        return "\n".join(f"- **{k}**: {json.dumps(v) if isinstance(v, (dict, list)) else v}"
                         for k, v in value.items())
    return str(value)


def _check_types(arch: dict, source: Path) -> None:
    """UserError naming the first architecture field whose JSON value has the wrong type."""
    hints = typing.get_type_hints(BackboneConfig)
    for name, value in arch.items():
        allowed = typing.get_args(hints[name]) or (hints[name],)
        if value is None and type(None) in allowed:
            continue
        ok = any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool)
                 or (t is float and isinstance(value, int) and not isinstance(value, bool))
                 for t in allowed if isinstance(t, type) and t is not type(None))
        if not ok:
            names = " or ".join(t.__name__ for t in allowed)
            raise UserError(f"{source}: architecture field '{name}' is {value!r}, expected "
                            f"{names}")


def build_backbone(config: dict, source: Path) -> DinoVisionTransformer:
    """A fresh backbone from an exported ``config.json`` (its ``architecture``)."""
    arch = dict(config.get("architecture") or {})
    known = {f.name for f in fields(BackboneConfig)}
    unknown = sorted(set(arch) - known)
    if unknown:
        raise UserError(f"{source}: unknown architecture fields {unknown} "
                        "(exported by a newer dinosys?)")
    arch["attn_backend"] = "auto"
    _check_types(arch, source)
    try:
        return backbone_from_config(BackboneConfig(**arch))
    except (ConfigError, TypeError) as exc:
        raise UserError(f"{source}: invalid architecture: {exc}") from exc


VIT_BACKBONE = register_model_type(ModelType(
    name=DinoVisionTransformer.model_type, describe=lambda m, card: backbone_config(m, card),
    build=build_backbone, card=lambda config, card, formats: backbone_card(config, card, formats)))
