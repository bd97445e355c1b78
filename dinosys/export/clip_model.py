"""The ``clip`` model type (native export of a :class:`CLIPModel`) and the ``open_clip`` format.

``config.json``: the model architecture (embedding size, image tower with its resolved backbone
and pooling, text tower), the logit scale/bias, normalisation, preprocessing and the tokenizer
(CLIP BPE, context length). ``model.safetensors`` holds every weight, a LiT tower's frozen
backbone included (``visual.locked.*``), so an export is self-contained. ``open_clip/`` (when
open_clip can express the model, see :mod:`dinosys.export.open_clip`) loads in open_clip as is.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from dinosys.config import ConfigError
from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.errors import UserError
from dinosys.export.native import FORMAT_NAMES, FORMAT_VERSION, provenance_markdown
from dinosys.export.open_clip import unsupported_reason, verify_open_clip, write_open_clip
from dinosys.export.registry import Exporter, ModelType, register_exporter, register_model_type
from dinosys.models.clip import CLIPModel, ClipModelConfig, ImageTowerConfig
from dinosys.models.text import TextConfig
from dinosys.models.vit import BackboneConfig, backbone_from_config


def clip_config(model: nn.Module, card: dict) -> dict[str, Any]:
    """config.json content of a CLIPModel."""
    arch = model.config_dict()
    arch["image"]["backbone"]["attn_backend"] = "auto"
    size = model.image_size
    return {
        "format": FORMAT_NAMES[0], "format_version": FORMAT_VERSION, "model_type": "clip",
        "architecture": arch,
        "embed_dim": model.cfg.embed_dim,
        "objective": card.get("objective", "siglip" if model.logit_bias is not None else "clip"),
        "num_parameters": sum(p.numel() for p in model.export_state_dict().values()),
        "normalization": {"mean": list(card.get("mean", IMAGENET_MEAN)),
                          "std": list(card.get("std", IMAGENET_STD))},
        "preprocessing": {"resize_shorter_side": size, "center_crop": size,
                          "interpolation": "bicubic",
                          "rescale": "pixels / 255, then (x - mean) / std"},
        "tokenizer": {"kind": "clip_bpe", "vocab_size": model.cfg.text.vocab_size,
                      "context_length": model.cfg.text.context_length},
        "open_clip": unsupported_reason(model) or "expressible",
    }


def _dataclass(cls: type, data: Any, where: Path, key: str):  # type: ignore[no-untyped-def]
    if not isinstance(data, dict):
        raise UserError(f"{where}: architecture.{key} must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown architecture.{key} fields {unknown} (exported by a "
                        "newer dinosys?)")
    try:
        return cls(**data)
    except (ConfigError, TypeError) as exc:
        raise UserError(f"{where}: invalid architecture.{key}: {exc}") from exc


def build_clip(config: dict[str, Any], where: Path) -> nn.Module:
    """A fresh CLIPModel of an export's architecture (a LiT tower gets a fresh backbone that
    the export's weights then fill)."""
    arch = config.get("architecture")
    if not isinstance(arch, dict):
        raise UserError(f"{where}: no architecture")
    image = dict(arch.get("image") or {})
    backbone = _dataclass(BackboneConfig, image.pop("backbone", {}), where, "image.backbone")
    image_cfg = _dataclass(ImageTowerConfig, {**image, "backbone": backbone}, where, "image")
    text_cfg = _dataclass(TextConfig, arch.get("text") or {}, where, "text")
    rest = {k: v for k, v in arch.items() if k not in ("image", "text")}
    cfg = _dataclass(ClipModelConfig, {**rest, "image": image_cfg, "text": text_cfg}, where, "")
    locked = backbone_from_config(backbone) if image_cfg.locked else None
    return CLIPModel(cfg, locked)


def clip_card(config: dict, card: dict | None, formats: list[str] | None) -> str:
    """README.md of an exported CLIP model."""
    card = dict(card or {})
    arch = config["architecture"]
    img, txt = arch["image"], arch["text"]
    bb = img["backbone"]
    tower = (f"locked {bb['arch']} + {img['trainable_blocks']} trainable blocks (LiT)"
             if img.get("locked") else f"{bb['arch']} trained")
    lines = [
        f"# {card.pop('name', 'clip')}", "",
        f"An image-text model exported by dinosys ({config['objective']} objective).", "",
        "| field | value |", "|---|---|",
        f"| image tower | {tower}, pooling {img['pool']}, {bb['img_size']} px |",
        f"| text tower | width {txt['width']}, {txt['layers']} layers, {txt['heads']} heads, "
        f"context {txt['context_length']} |",
        f"| embedding | {config['embed_dim']} |",
        f"| parameters | {config['num_parameters']:,} |",
        f"| open_clip | {config['open_clip']} |", "",
        "## Loading", "", "```python", "import dinosys.export",
        "from dinosys.data.tokenizer import get_tokenizer", "",
        "model = dinosys.export.load('THIS_DIR')  # CLIPModel, eval mode, CPU",
        "img = model.encode_image(images)  # normalised",
        f"txt = model.encode_text(get_tokenizer({txt['context_length']})(['a photo of a cat']))",
        "```", "",
    ]
    if "open_clip" in (formats or []):
        lines += ["open_clip (as is):", "", "```python", "import open_clip", "",
                  "model, _, preprocess = open_clip.create_model_and_transforms("
                  "'local-dir:THIS_DIR/open_clip')",
                  "tokenizer = open_clip.get_tokenizer('local-dir:THIS_DIR/open_clip')", "```",
                  ""]
    formats = formats or []
    if "timm" in formats:
        lines += ["timm (the image tower, the projection as its head): "
                  "`timm.create_model('local-dir:THIS_DIR/timm', pretrained=True)`; "
                  "`F.normalize(model(x), dim=-1)` is the image embedding.", ""]
    if "hf" in formats:
        lines += ["Hugging Face (the image tower): `AutoModel.from_pretrained('THIS_DIR/hf')` "
                  "plus the projection `hf/image_projection.safetensors` (`weight`), applied as "
                  "`hf/image_projection.json` says: normalize(pool(last_hidden_state) @ "
                  "weight.T).", ""]
    if "onnx" in formats:
        lines += ["ONNX (the image tower): `onnx/model.onnx`, input `pixel_values` (N, 3, "
                  f"{bb['img_size']}, {bb['img_size']}), output `image_embeds` (normalised).", ""]
    provenance = card.pop("provenance", None)
    lines += [f"- {k}: {v}" for k, v in card.items()]
    if provenance:
        lines += ["", "## Provenance", "", provenance_markdown(provenance)]
    return "\n".join(lines) + "\n"


def _write_open_clip(model: nn.Module, out: Path, config: dict) -> None:
    norm = config["normalization"]
    write_open_clip(model, out / "open_clip", tuple(norm["mean"]), tuple(norm["std"]),
                    verify=False)


def _check_open_clip(model: nn.Module, out: Path, config: dict) -> dict[str, Any]:
    return {"max_abs_diff": verify_open_clip(model, out / "open_clip")}


register_model_type(ModelType("clip", clip_config, build_clip, clip_card))
register_exporter(Exporter("open_clip", ("clip",), _write_open_clip, _check_open_clip))
