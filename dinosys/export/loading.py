"""``load(path)``: a ready model (eval mode, CPU) from an export (built by its ``model_type``),
a run directory or a checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dinosys.config import ConfigError
from dinosys.errors import UserError
from dinosys.export.convert import load_state_dict_strict
from dinosys.export.native import FORMAT_NAMES, LEGACY_MODEL_TYPE
from dinosys.export.registry import MODEL_TYPES
from dinosys.models import DinoVisionTransformer, backbone_from_config
from dinosys.models.vit import BackboneConfig

log = logging.getLogger(__name__)


def is_exported_dir(path: Path) -> bool:
    """Whether ``path`` holds a native export (config.json + model.safetensors)."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def read_export_config(path: Path) -> dict:
    """The ``config.json`` of an exported directory, checked to be a dinosys model config."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read model config {path / 'config.json'}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") not in FORMAT_NAMES:
        raise UserError(f"{path / 'config.json'} is not a dinosys model config "
                        f"(expected \"format\": \"{FORMAT_NAMES[0]}\")")
    return data


def load_exported(path: Path) -> nn.Module:
    """The model of a native export directory, built by its ``model_type`` (exports without
    one are backbones), weights loaded, eval mode, CPU."""
    data = read_export_config(path)
    name = data.get("model_type", LEGACY_MODEL_TYPE)
    if name not in MODEL_TYPES:
        raise UserError(f"{path / 'config.json'}: model_type {name!r} is not one of "
                        f"{sorted(MODEL_TYPES)} (exported by a newer dinosys?)")
    model = MODEL_TYPES[name].build(data, path / "config.json")
    weights = path / "model.safetensors"
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read model weights {weights}: {exc}") from exc
    loader = getattr(model, "load_export_state_dict", None)  # the counterpart of
    if loader is not None:                                    # export_state_dict (native.py)
        loader(state, f"weights from {weights}")
    else:
        load_state_dict_strict(model, state, f"weights from {weights}")
    return model.eval()


def _build(cfg: BackboneConfig, state: dict, source: Path) -> DinoVisionTransformer:
    try:
        model = backbone_from_config(cfg)
    except ConfigError as exc:
        raise UserError(f"{source}: cannot build the backbone: {exc}") from exc
    load_state_dict_strict(model, state, f"weights from {source}")
    return model.eval()


def run_export_dir(run_dir: Path) -> Path | None:
    """The exported model of a run directory: ``RUN/export/<name>/`` when the run exported one
    model (``teacher`` when it exported several), ``RUN/export/`` for runs of older versions;
    None when it has none. UserError when several exports leave the choice open."""
    root = run_dir / "export"
    if is_exported_dir(root):
        return root
    if not root.is_dir():
        return None
    names = sorted(p.name for p in root.iterdir() if is_exported_dir(p))
    if not names:
        return None
    if len(names) == 1:
        return root / names[0]
    if "teacher" in names:
        return root / "teacher"
    raise UserError(f"run {run_dir} exported several models ({', '.join(names)}); pass one of "
                    f"{root}/<name>")


def _run_dir_of_checkpoint(ckpt: Path) -> Path:
    """RUN for RUN/checkpoints/<step>; the run config sits at RUN/config.yaml."""
    return ckpt.resolve().parent.parent


def load_checkpoint(path: Path, prefix: str | None = None) -> DinoVisionTransformer:
    """A backbone from a training checkpoint (or the newest one of a run directory); ``prefix``
    (default: the run's task's ``checkpoint_backbone``, e.g. ``teacher.backbone`` for SSL) names
    the module in the checkpoint."""
    from dinosys.distributed.sharded_checkpoint import load_backbone_state, resolve_checkpoint
    from dinosys.train.tasks import get_task, load_task_config

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
    run_cfg = load_task_config(run_config)
    task = get_task(run_cfg.task)
    prefix = prefix or task.checkpoint_backbone
    cfg = getattr(run_cfg, "model", None)
    if prefix is None or not isinstance(cfg, BackboneConfig):
        raise UserError(f"checkpoint {ckpt} of task '{run_cfg.task}' holds no backbone to load; "
                        "pass an exported model (RUN/export/<name>)")
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
    export = run_export_dir(path)
    if export is not None:
        return load_exported(export)
    if (path / "config.json").is_file() and not (path / "model.safetensors").exists():
        raise UserError(f"{path} has config.json but no model.safetensors: incomplete export")
    return load_checkpoint(path)
