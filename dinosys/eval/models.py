"""Backbones for evaluation: a saved model (``dinosys.export.load``) or a random-init baseline."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from torch import nn

from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.errors import UserError

RANDOM_PREFIX = "random:"


def load_eval_model(spec: str) -> nn.Module:
    """``random:ARCH[:IMG_SIZE]`` or ``random:PATH`` (PATH's architecture) -> a freshly
    initialised backbone (seed 0), else
    ``dinosys.export.load(spec)`` (run directory, checkpoint or exported directory)."""
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        import torch

        from dinosys.models import create_backbone

        rest = spec[len(RANDOM_PREFIX):]
        if Path(rest).exists():  # the architecture of a saved model, freshly initialised
            from dinosys.export import load
            from dinosys.models import backbone_from_config

            cfg = load(rest).cfg
            torch.manual_seed(0)
            return backbone_from_config(cfg).eval()
        arch, _, size = rest.partition(":")
        kwargs = {"img_size": int(size)} if size else {}
        torch.manual_seed(0)
        try:
            return create_backbone(arch, **kwargs).eval()
        except (KeyError, ValueError) as exc:
            raise UserError(f"cannot build random baseline {spec!r}: {exc}") from exc
    from dinosys.export import load

    return load(spec).eval()


def model_image_size(model: nn.Module) -> int:
    """The image size the model was trained at (its config's ``img_size``)."""
    cfg = getattr(model, "cfg", None)
    size = getattr(cfg, "img_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if not size:
        raise UserError("the model does not say its image size (no cfg.img_size)")
    return int(size)


def model_normalisation(spec: str | Path | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std a saved model was trained with: the export's ``config.json``
    ``normalization``, else the run's ``config.yaml`` ``crops.mean/std``, else ImageNet's."""
    if spec is not None and not str(spec).startswith(RANDOM_PREFIX):
        path = Path(spec)
        for cfg_json in (path / "config.json", path / "export" / "config.json"):
            if cfg_json.is_file():
                try:
                    norm = json.loads(cfg_json.read_text()).get("normalization") or {}
                except (OSError, json.JSONDecodeError):
                    norm = {}
                if norm.get("mean") and norm.get("std"):
                    return tuple(norm["mean"]), tuple(norm["std"])
        for run_cfg in (path / "config.yaml", path.parent.parent / "config.yaml"):
            if run_cfg.is_file():
                try:
                    crops = (yaml.safe_load(run_cfg.read_text()) or {}).get("crops") or {}
                except (OSError, yaml.YAMLError):
                    crops = {}
                if crops.get("mean") and crops.get("std"):
                    return tuple(crops["mean"]), tuple(crops["std"])
    return IMAGENET_MEAN, IMAGENET_STD
