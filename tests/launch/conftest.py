"""Fixtures of the launcher tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An exported 1-block vit_tiny with random weights (curation and evaluation input)."""
    from dinosys.export import save_native
    from dinosys.models import create_backbone

    out = tmp_path_factory.mktemp("launch-model") / "model"
    model = create_backbone("vit_tiny", img_size=28, embed_dim=32, depth=1, num_heads=2)
    save_native(model, out)
    return out
