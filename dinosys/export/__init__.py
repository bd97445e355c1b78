"""Exported models: native safetensors + config (``model_type``) and the EXPORTERS registry
(timm / Hugging Face / ONNX, ... by model type).

``save_native(model, out_dir, card)`` writes an exported directory; ``load(path)`` returns the
model an exported directory, a run directory or a checkpoint holds; ``export_model`` writes every
requested format through one path.
"""

from dinosys.export import vit_backbone  # noqa: F401  (registers the vit_backbone model type)
from dinosys.export.loading import load
from dinosys.export.native import save_native
from dinosys.export.registry import EXPORTERS, MODEL_TYPES, register_exporter, register_model_type

__all__ = ["EXPORTERS", "MODEL_TYPES", "load", "register_exporter", "register_model_type",
           "save_native"]

from dinosys.export import (
           clip_image,  # noqa: E402, F401  (timm/hf/onnx of a clip image tower)
           clip_model,  # noqa: E402, F401  (the clip model type + open_clip)
           exporter,  # noqa: E402, F401  (registers the backbone formats)
)
