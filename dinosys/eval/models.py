"""Models for evaluation: a saved model (``dinosys.export.load``) or a random-init baseline, and
:class:`EvalModel`, the frozen module with its preprocessing that every evaluator receives."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
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
    """The image size the model was trained at (its config's ``img_size``, else the module's
    ``image_size`` attribute, e.g. a CLIP model's)."""
    cfg = getattr(model, "cfg", None)
    size = getattr(cfg, "img_size", None) or getattr(model, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if not size:
        raise UserError("the model does not say its image size (no cfg.img_size or image_size)")
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


def default_device() -> torch.device:
    """This process's accelerator (``cuda:LOCAL_RANK`` when there is one), else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass
class EvalModel:
    """A frozen model as evaluators see it: the module (eval mode, on ``device``), its input
    size and normalisation, and the name results are reported under."""

    module: nn.Module
    name: str
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    device: torch.device = field(default_factory=default_device)

    def __post_init__(self) -> None:
        self.module = self.module.to(self.device)

    @classmethod
    def load(cls, spec: str | Path, device: torch.device | None = None) -> EvalModel:
        """A saved model (run directory, checkpoint, export) or ``random:...`` baseline."""
        module = load_eval_model(str(spec))
        mean, std = model_normalisation(spec)
        return cls(module, str(spec), model_image_size(module), mean, std,
                   device or default_device())

    @classmethod
    def wrap(cls, module: nn.Module, mean: tuple[float, ...] = IMAGENET_MEAN,
             std: tuple[float, ...] = IMAGENET_STD, name: str | None = None,
             device: torch.device | None = None) -> EvalModel:
        """An in-memory module (e.g. the teacher during training)."""
        return cls(module, name or type(module).__name__, model_image_size(module),
                   tuple(mean), tuple(std), device or default_device())


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, its previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def as_eval_model(model: EvalModel | nn.Module | str | Path) -> EvalModel:
    """An :class:`EvalModel` from itself, a module (ImageNet normalisation) or a model spec."""
    if isinstance(model, EvalModel):
        return model
    if isinstance(model, nn.Module):
        return EvalModel.wrap(model)
    return EvalModel.load(model)
