"""Fixtures of the evaluation tests: a tiny exported backbone and small real image folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported 2-block ViT (28 px, patch 14: 4 patch tokens) with random weights."""
    import torch

    from dinosys.export import save_native
    from dinosys.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("vit_tiny", img_size=28, patch_size=14, embed_dim=32, depth=2,
                            num_heads=2, layerscale_init=None)
    out = tmp_path_factory.mktemp("eval-model") / "model"
    save_native(model.eval(), out)
    return out


def copy_subset(src: Path, dst: Path, per_class: int, classes: list[str]) -> Path:
    """``dst/<class>/`` with the first ``per_class`` images of each of ``classes``."""
    for name in classes:
        target = dst / name
        target.mkdir(parents=True)
        for path in sorted((src / name).iterdir())[:per_class]:
            shutil.copy(path, target / path.name)
    return dst


@pytest.fixture(scope="session")
def small_digits(builtin_data: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Path, Path]:
    """Real sklearn digits: 40 train / 12 val images for each of 6 classes."""
    root = tmp_path_factory.mktemp("digits_small")
    classes = [str(c) for c in range(6)]
    train = copy_subset(builtin_data / "digits" / "train", root / "train", 40, classes)
    val = copy_subset(builtin_data / "digits" / "val", root / "val", 12, classes)
    return train, val
