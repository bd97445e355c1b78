"""Feature extractors for curation: a dinosys run/export/checkpoint or a timm model, producing
cls, avg-pooled patch, or cls+avgpool features of the last n blocks."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.errors import UserError

log = logging.getLogger(__name__)

BUILTIN_COPY_DETECTOR = "builtin:copy_detector"  # the small detector shipped in curation/assets
# centred grey pixels at embed.img_size: the near-duplicate embedding of small images whose
# natural neighbours are closer than any learned copy embedding separates (MNIST digits: two
# writers' "1"s reach cosine 0.98, a JPEG or noise re-encoding of one image stays above 0.986)
BUILTIN_PIXELS = "builtin:pixels"


@dataclass
class FeatureModel:
    """A backbone plus how to turn its outputs into one embedding per image."""

    model: nn.Module
    kind: str  # "dinosys", "timm" or "pixels"
    mean: list[float]
    std: list[float]
    patch_size: int
    prefix_tokens: int = 1  # timm: cls + registers before the patch tokens


def _find_norm(obj: object) -> tuple[list[float], list[float]] | None:
    """Look for normalisation mean/std anywhere in an exported config.json."""
    if isinstance(obj, dict):
        if isinstance(obj.get("mean"), list) and isinstance(obj.get("std"), list):
            return [float(v) for v in obj["mean"]], [float(v) for v in obj["std"]]
        for value in obj.values():
            found = _find_norm(value)
            if found:
                return found
    return None


def _exported_norm(path: Path) -> tuple[list[float], list[float]] | None:
    for cand in (path / "config.json", path / "export" / "config.json"):
        if cand.is_file():
            try:
                return _find_norm(json.loads(cand.read_text()))
            except (OSError, json.JSONDecodeError):
                return None
    return None


def load_feature_model(spec: str, mean: list[float] | None = None,
                       std: list[float] | None = None) -> FeatureModel:
    """Load ``spec``: a dinosys run/export/checkpoint directory, ``timm:<name>``, or
    ``builtin:copy_detector`` (the copy-detection ViT that ships with dinosys) or
    ``builtin:pixels`` (centred grey pixels, no model)."""
    if spec == BUILTIN_PIXELS:
        return FeatureModel(nn.Identity(), "pixels", list(mean or IMAGENET_MEAN),
                            list(std or IMAGENET_STD), 1, 0)
    if spec.startswith("timm:"):
        from dinosys.export.compat import import_timm

        timm = import_timm()
        name = spec[len("timm:"):]
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:  # timm raises many types for unknown names / missing weights
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot create timm model '{name}': {msg}") from exc
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
        return FeatureModel(model.eval(), "timm", list(mean or cfg.get("mean", IMAGENET_MEAN)),
                            list(std or cfg.get("std", IMAGENET_STD)), int(patch[0]),
                            int(getattr(model, "num_prefix_tokens", 1)))
    if spec == BUILTIN_COPY_DETECTOR:
        from curation.copy_train import SHIPPED

        spec = str(SHIPPED)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"embedding model not found: '{spec}' (a dinosys run/export directory, "
                        f"timm:<name>, {BUILTIN_COPY_DETECTOR} or {BUILTIN_PIXELS})")
    from dinosys.export import load

    model = load(path).eval()
    norm = _exported_norm(path) if path.is_dir() else None
    default_mean, default_std = norm or (IMAGENET_MEAN, IMAGENET_STD)
    return FeatureModel(model, "dinosys", list(mean or default_mean), list(std or default_std),
                        int(getattr(model, "patch_size", 14)))


def _pool(cls: torch.Tensor, patches: torch.Tensor, features: str) -> torch.Tensor:
    cls = F.normalize(cls.float(), dim=-1)
    if features == "cls":
        return cls
    avg = F.normalize(patches.float().mean(dim=1), dim=-1)
    if features == "avgpool":
        return avg
    return torch.cat([cls, avg], dim=-1)  # each half unit-norm: both weigh the same


@torch.inference_mode()
def extract(fm: FeatureModel, images: torch.Tensor, features: str, n_layers: int) -> torch.Tensor:
    """L2-normalised float32 embeddings (B, D') of a normalised image batch.

    With ``n_layers > 1`` the pooled features of the last n blocks are each L2-normalised and
    concatenated, so every layer weighs the same in the cosine similarity.
    """
    parts: list[torch.Tensor] = []
    if fm.kind == "pixels":  # per-channel affine normalisation leaves the centred grey image's
        grey = images.float().mean(dim=1).flatten(1)  # direction unchanged
        return F.normalize(grey - grey.mean(dim=1, keepdim=True), dim=-1)
    if fm.kind == "dinosys":
        if n_layers == 1:
            out = fm.model(images)
            parts.append(_pool(out["x_norm_clstoken"], out["x_norm_patchtokens"], features))
        else:
            layers = fm.model.get_intermediate_layers(images, n=n_layers, return_class_token=True,
                                                      norm=True)
            for patches, cls in layers:
                parts.append(_pool(cls, patches, features))
    else:
        if n_layers == 1:
            tokens = fm.model.forward_features(images)
            tokens_list = [tokens]
        else:
            layers = fm.model.forward_intermediates(images, indices=n_layers,
                                                    return_prefix_tokens=True, norm=True,
                                                    output_fmt="NLC", intermediates_only=True)
            tokens_list = [torch.cat([prefix, spatial], dim=1) for spatial, prefix in layers]
        for tokens in tokens_list:
            parts.append(_pool(tokens[:, 0], tokens[:, fm.prefix_tokens:], features))
    parts = [F.normalize(p.float(), dim=-1) for p in parts]
    return F.normalize(torch.cat(parts, dim=-1), dim=-1)
