"""Fixtures of the evaluation tests: small real image folders (the tiny exported backbone,
``tiny_export``, is shared: tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


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
