"""Import timm (and torchvision's pure-Python parts) on a torch whose torchvision build mismatches.

On the CPU development machine torchvision 0.28 is a CUDA build: its C extension does not load,
and ``import torchvision`` then dies in ``torchvision/_meta_registrations.py`` with
``operator torchvision::nms does not exist`` because it registers fake kernels for ops that were
never defined. timm imports torchvision, so timm fails too. Defining the two op *schemas* it
needs (``torchvision::nms`` and ``torchvision::qnms``) with ``torch.library`` lets the import
finish; the ops themselves stay unusable (calling them raises), which timm's ViTs never do.
On machines where torchvision imports normally nothing is changed.

Importing this module is enough: ``import dinosys.export.compat`` then ``import timm`` (or
``transformers``, ``open_clip``) works. The helpers below do the same on demand.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType

import torch

log = logging.getLogger(__name__)

# op name -> schema (torchvision's own definitions, csrc/ops/nms.cpp)
_MISSING_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it removes the schemas


def _define_missing_torchvision_ops() -> list[str]:
    global _LIBRARY
    defined = []
    for name, schema in _MISSING_OP_SCHEMAS.items():
        if hasattr(torch.ops.torchvision, name):
            continue
        if _LIBRARY is None:
            _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        _LIBRARY.define(schema)
        defined.append(name)
    return defined


def _forget_partial_import(prefix: str) -> None:
    for mod in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[mod]


def import_torchvision() -> ModuleType:
    """``import torchvision``, defining missing op schemas first if its C extension is broken."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::" not in str(exc) or "does not exist" not in str(exc):
            raise
        _forget_partial_import("torchvision")
        defined = _define_missing_torchvision_ops()
        log.info("torchvision C extension unavailable; defined op schemas %s so that its "
                 "pure-Python parts import (detection ops stay unusable)", defined)
        return importlib.import_module("torchvision")


def import_timm() -> ModuleType:
    """``import timm`` on any machine (see the module docstring); raises ImportError if absent."""
    if "timm" not in sys.modules:
        try:
            import_torchvision()
        except ImportError:
            pass  # timm works without torchvision for our purposes
    return importlib.import_module("timm")


def import_transformers() -> ModuleType:
    """``import transformers`` with torchvision made importable first (its image utilities
    import torchvision whenever the package is installed)."""
    if "transformers" not in sys.modules:
        try:
            import_torchvision()
        except ImportError:
            pass
    return importlib.import_module("transformers")


def _make_torchvision_importable() -> None:
    """Run at import: afterwards a plain ``import timm`` works (torchvision absent: nothing)."""
    try:
        import_torchvision()
    except ImportError:
        pass


_make_torchvision_importable()
