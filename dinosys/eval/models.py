"""Backbones for evaluation: a saved model (``dinosys.export.load``) or a random-init baseline."""

from __future__ import annotations

from torch import nn

from dinosys.errors import UserError
from dinosys.eval.images import IMAGENET_MEAN, IMAGENET_STD

RANDOM_PREFIX = "random:"


def load_eval_model(spec: str) -> nn.Module:
    """``random:ARCH[:IMG_SIZE]`` -> a freshly initialised backbone (seed 0), else
    ``dinosys.export.load(spec)`` (run directory, checkpoint or exported directory)."""
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        import torch

        from dinosys.models import create_backbone

        arch, _, size = spec[len(RANDOM_PREFIX):].partition(":")
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


def model_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std the model was trained with (``model.preprocessing``), else ImageNet's."""
    pre = getattr(model, "preprocessing", None) or {}
    mean = pre.get("mean") if isinstance(pre, dict) else None
    std = pre.get("std") if isinstance(pre, dict) else None
    return tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)
