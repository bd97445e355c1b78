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
    if card and card.get("provenance"):  # the factory's chain: manifest, run, teacher, eval
        config["provenance"] = card["provenance"]
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


def provenance_markdown(chain: dict) -> str:
    """The model card's "Provenance" section for a ``provenance`` chain (``dinosys pipeline``):
    pipeline, curation manifest and counts, training run, teacher, evaluation results."""
    rows = []
    pipe = chain.get("pipeline")
    if pipe:
        rows.append(("pipeline", f"`{pipe.get('name')}` in `{pipe.get('dir')}` (config sha256 "
                                 f"`{pipe.get('config_sha256')}`)"))
    cur = chain.get("curation")
    if cur:
        rows.append(("curation manifest", f"`{cur.get('manifest')}` (sha256 "
                                          f"`{cur.get('manifest_sha256')}`)"))
        rows.append(("curation counts", f"kept {cur.get('kept')} of {cur.get('pool')}; removed "
                     f"{cur.get('removed_near_duplicates')} near-duplicates, "
                     f"{cur.get('removed_contamination')} eval contamination, "
                     f"{cur.get('removed_exact_duplicates')} exact duplicates"))
    train = chain.get("training")
    if train:
        rows.append(("training run", f"{train.get('stage')} `{train.get('recipe')}` in "
                     f"`{train.get('run_dir')}`, {train.get('steps')} steps (config sha256 "
                     f"`{train.get('config_sha256')}`)"))
    teacher = chain.get("teacher")
    if teacher:
        rows.append(("teacher", f"`{teacher.get('path')}` (weights sha256 "
                                f"`{teacher.get('sha256')}`)"))
    for metric, value in sorted((chain.get("evaluation") or {}).items()):
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        rows.append((f"evaluation {metric}", shown))
    lines = ["| link | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             "`dinosys info THIS_DIR` prints this chain (`--json`: as config.json holds it)."]
    return "\n".join(lines)
