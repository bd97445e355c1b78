"""The native exported-model directory, for every model type: model.safetensors + config.json
(with ``model_type``) + README.md model card.

Directories are written through a temporary sibling and renamed into place, so readers never see
half an export. The content of config.json and README.md comes from the model type
(:mod:`dinosys.export.registry`).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from dinosys.atomic import atomic_directory
from dinosys.export.registry import MODEL_TYPES, model_type_of

#: values of config.json "format" that load: the current one first, then older exports'
FORMAT_NAMES = ("dinosys-model", "dinosys-backbone")
FORMAT_VERSION = 2
#: config.json of exports that predate model types describe a backbone
LEGACY_MODEL_TYPE = "vit_backbone"


def write_native(model: nn.Module, out_dir: Path, card: dict | None = None,
                 formats: list[str] | None = None) -> dict:
    """Write the native files into an existing directory (no atomicity); returns the config."""
    model_type = MODEL_TYPES[model_type_of(model)]
    config = model_type.describe(model, card or {})
    # a model may hold weights outside its state_dict (a frozen backbone that checkpoints skip):
    # ``export_state_dict()`` gives every weight the export needs
    weights = getattr(model, "export_state_dict", model.state_dict)()
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").write_text(model_type.card(config, card or {}, formats or []))
    return config


def save_native(model: nn.Module, out_dir: Path, card: dict | None = None) -> Path:
    """Export ``model`` to ``out_dir`` (model.safetensors, config.json, README.md), atomically.

    ``card``: optional model-card fields (``name``, ``data``, ``recipe``, ``evaluation``, any
    other key; ``mean``/``std`` override the ImageNet normalisation).
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_native(model, tmp, card)
    return out_dir
