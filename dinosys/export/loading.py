"""``load(path)``: a ready backbone (eval mode, CPU) from an export, a run or a checkpoint."""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dinosys.config import BackboneConfig, ConfigError
from dinosys.errors import UserError
from dinosys.export.convert import load_state_dict_strict
from dinosys.export.native import FORMAT_NAME
from dinosys.models import DinoVisionTransformer, backbone_from_config

log = logging.getLogger(__name__)


def is_exported_dir(path: Path) -> bool:
    """Whether ``path`` holds a native export (config.json + model.safetensors)."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _config_from_export(path: Path) -> BackboneConfig:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read model config {path / 'config.json'}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise UserError(f"{path / 'config.json'} is not a dinosys model config "
                        f"(expected \"format\": \"{FORMAT_NAME}\")")
    arch = dict(data.get("architecture") or {})
    known = {f.name for f in fields(BackboneConfig)}
    unknown = sorted(set(arch) - known)
    if unknown:
        raise UserError(f"{path / 'config.json'}: unknown architecture fields {unknown} "
                        "(exported by a newer dinosys?)")
    arch["attn_backend"] = "auto"
    try:
        return BackboneConfig(**arch)
    except (ConfigError, TypeError) as exc:
        raise UserError(f"{path / 'config.json'}: invalid architecture: {exc}") from exc


def _build(cfg: BackboneConfig, state: dict, source: Path) -> DinoVisionTransformer:
    try:
        model = backbone_from_config(cfg)
    except ConfigError as exc:
        raise UserError(f"{source}: cannot build the backbone: {exc}") from exc
    load_state_dict_strict(model, state, f"weights from {source}")
    return model.eval()


def load_exported(path: Path) -> DinoVisionTransformer:
    """A backbone from a native export directory."""
    cfg = _config_from_export(path)
    weights = path / "model.safetensors"
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read model weights {weights}: {exc}") from exc
    return _build(cfg, state, weights)


def _run_dir_of_checkpoint(ckpt: Path) -> Path:
    """RUN for RUN/checkpoints/<step>; the run config sits at RUN/config.yaml."""
    return ckpt.resolve().parent.parent


def load_checkpoint(path: Path, prefix: str = "teacher.backbone") -> DinoVisionTransformer:
    """A backbone from a training checkpoint (or the newest one of a run directory)."""
    from dinosys.config import TrainConfig, load_config
    from dinosys.distributed.sharded_checkpoint import load_backbone_state, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(path)
    except UserError:
        looks_like_checkpoints = (path / "checkpoints").is_dir() or (path / ".metadata").exists() \
            or any(p.name.startswith("step_") for p in path.iterdir())
        if looks_like_checkpoints:
            raise
        raise UserError(f"{path} is not an exported model (config.json + model.safetensors), "
                        "a run directory (export/ or checkpoints/) or a checkpoint") from None
    run_config = _run_dir_of_checkpoint(ckpt) / "config.yaml"
    if not run_config.is_file():
        raise UserError(f"checkpoint {ckpt} has no run config at {run_config}; "
                        "pass the run directory or an exported model")
    cfg = load_config(TrainConfig, run_config).model
    state = load_backbone_state(ckpt, prefix=prefix)
    log.info("loaded %s from checkpoint %s", prefix, ckpt)
    return _build(cfg, state, ckpt)


def load(path: str | Path) -> nn.Module:
    """A backbone in eval mode on CPU from ``path``.

    ``path`` is an exported directory (config.json + model.safetensors), a run directory
    (its ``export/`` if present, else its newest checkpoint), or a checkpoint directory
    (run config read from two levels up). Anything else raises UserError naming the path.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path {path} does not exist")
    if path.is_file():
        if path.name in ("model.safetensors", "config.json") and is_exported_dir(path.parent):
            return load_exported(path.parent)
        raise UserError(f"model path {path} is a file; pass the exported model directory")
    if is_exported_dir(path):
        return load_exported(path)
    if is_exported_dir(path / "export"):
        return load_exported(path / "export")
    if (path / "config.json").is_file() and not (path / "model.safetensors").exists():
        raise UserError(f"{path} has config.json but no model.safetensors: incomplete export")
    return load_checkpoint(path)
