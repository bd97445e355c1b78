"""What can be exported and how: model types and export formats, both registries.

``MODEL_TYPES``: what an exported directory's ``config.json`` ``model_type`` names (the model
class's ``model_type`` attribute): how to describe a model in ``config.json``, how to rebuild it
from that, and its README model card. ``EXPORTERS``: format -> the model types it supports, how
to write it into the export directory and how to check what was written (load it back with the
target library and compare features). ``native`` (safetensors + config.json + README.md) is
always written and supports every model type. A new model (e.g. CLIP) registers its model type
and the formats it supports (e.g. ``open_clip``, or its own writer for an existing format such
as ``onnx``) with :func:`register_model_type` / :func:`register_exporter`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelType:
    """One kind of exported model."""

    name: str
    #: (model, card) -> the config.json content (must include "model_type": name)
    describe: Callable[[nn.Module, dict], dict[str, Any]]
    #: (config.json content, where it was read for error messages) -> a fresh model
    build: Callable[[dict[str, Any], Path], nn.Module]
    #: (config.json content, card, formats written) -> README.md text
    card: Callable[[dict[str, Any], dict, list[str]], str]


@dataclass(frozen=True)
class Exporter:
    """One export format: written into ``DIR/<format>/`` beside the native files."""

    format: str
    model_types: tuple[str, ...]
    #: (model, export directory being written, native config) -> None
    write: Callable[[nn.Module, Path, dict[str, Any]], None]
    #: (model, export directory, native config) -> summary with "max_abs_diff" (None: the
    #: library needed to check is not installed)
    check: Callable[[nn.Module, Path, dict[str, Any]], dict[str, Any]]


MODEL_TYPES: dict[str, ModelType] = {}
EXPORTERS: dict[str, Exporter] = {}


def register_model_type(model_type: ModelType) -> ModelType:
    """Add a model type (its name must be new)."""
    if model_type.name in MODEL_TYPES:
        raise ValueError(f"model type {model_type.name!r} is already registered")
    MODEL_TYPES[model_type.name] = model_type
    return model_type


def register_exporter(exporter: Exporter) -> Exporter:
    """Add an export format, or more model types to a registered one (e.g. ``onnx`` for
    ``clip`` beside ``vit_backbone``): the format's entry then writes and checks each model
    with the exporter registered for its model type. A (format, model type) pair is registered
    once."""
    old = EXPORTERS.get(exporter.format)
    if old is None:
        EXPORTERS[exporter.format] = exporter
        return exporter
    both = sorted(set(old.model_types) & set(exporter.model_types))
    if both:
        raise ValueError(f"export format {exporter.format!r} is already registered for "
                         f"model type(s) {both}")
    EXPORTERS[exporter.format] = _by_model_type(old, exporter)
    return exporter


def _by_model_type(first: Exporter, second: Exporter) -> Exporter:
    """One format's entry that hands each model to ``first`` or ``second`` by model type."""

    def pick(model: nn.Module) -> Exporter:
        return second if model_type_of(model) in second.model_types else first

    return Exporter(first.format, first.model_types + second.model_types,
                    write=lambda model, out, config: pick(model).write(model, out, config),
                    check=lambda model, out, config: pick(model).check(model, out, config))


def model_type_of(model: nn.Module) -> str:
    """The registered model type of ``model`` (its ``model_type`` attribute)."""
    from dinosys.errors import UserError

    name = getattr(model, "model_type", None)
    if name not in MODEL_TYPES:
        raise UserError(f"cannot export a {type(model).__name__}: model type {name!r} is not "
                        f"one of {sorted(MODEL_TYPES)}")
    return name
