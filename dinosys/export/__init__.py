"""Exported models: native safetensors + config, timm / Hugging Face / ONNX conversions.

``save_native(backbone, out_dir, card)`` writes an exported directory; ``load(path)`` returns
a ready backbone from an exported directory, a run directory or a checkpoint.
"""

from dinosys.export.loading import load
from dinosys.export.native import save_native

__all__ = ["load", "save_native"]
