"""The native exported-model directory: model.safetensors + config.json + README.md model card.

``config.json`` holds everything needed to rebuild and feed the model: the resolved
BackboneConfig, patch size, registers, embedding size, normalisation mean/std and preprocessing.
Directories are written through a temporary sibling and renamed into place, so readers never see
half an export.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from dinosys.atomic import atomic_directory
from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD

FORMAT_NAME = "dinosys-backbone"
FORMAT_VERSION = 1


def native_config(backbone: nn.Module, card: dict | None = None) -> dict:
    """The ``config.json`` content for ``backbone`` (a DinoVisionTransformer)."""
    card = card or {}
    cfg = backbone.cfg
    arch = asdict(cfg)
    arch["attn_backend"] = "auto"  # the exporting machine's backend says nothing about the user's
    mean = list(card.get("mean", IMAGENET_MEAN))
    std = list(card.get("std", IMAGENET_STD))
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
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


def model_card(config: dict, card: dict | None = None, formats: list[str] | None = None) -> str:
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


def write_native(backbone: nn.Module, out_dir: Path, card: dict | None = None,
                 formats: list[str] | None = None) -> dict:
    """Write the native files into an existing directory (no atomicity); returns the config."""
    config = native_config(backbone, card)
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").write_text(model_card(config, card, formats))
    return config


def save_native(backbone: nn.Module, out_dir: Path, card: dict | None = None) -> Path:
    """Export ``backbone`` to ``out_dir`` (model.safetensors, config.json, README.md), atomically.

    ``card``: optional model-card fields (``name``, ``data``, ``recipe``, ``evaluation``, any
    other key; ``mean``/``std`` override the ImageNet normalisation).
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_native(backbone, tmp, card)
    return out_dir
