"""Importing dinosys.export.compat is enough for a plain `import timm` (mismatched torchvision)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)


def test_import_compat_then_timm_and_transformers():
    if importlib.util.find_spec("timm") is None:  # importing it here would fail on this CPU
        pytest.skip("timm not installed")
    proc = _run("import dinosys.export.compat\nimport timm\nimport transformers\n"
                "m = timm.create_model('vit_small_patch14_dinov2', pretrained=False, "
                "img_size=28, num_classes=0)\nprint('OK', type(m).__name__)")
    assert proc.returncode == 0 and "OK VisionTransformer" in proc.stdout, proc.stderr[-2000:]
