"""`dinosys eval knn` bad input is one line, exit 2 (issue 18, item 11)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def folders(tmp_path: Path, builtin_data: Path) -> tuple[Path, Path]:
    for split, n in (("train", 6), ("val", 4)):
        for label in ("0", "1"):
            dst = tmp_path / split / label
            dst.mkdir(parents=True)
            for src in sorted((builtin_data / "mnist" / split / label).glob("*.png"))[:n]:
                shutil.copy(src, dst / src.name)
    return tmp_path / "train", tmp_path / "val"


def _knn(train: Path, val: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dinosys.cli", "eval", "knn", "--model",
                           "random:vit_tiny", "--train", str(train), "--val", str(val), *extra],
                          capture_output=True, text=True, env=env, timeout=300)


def _one_line(res: subprocess.CompletedProcess, *needles: str) -> None:
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "\n" not in err and "Traceback" not in err and err.startswith("dinosys: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_a_bad_image_decoded_in_a_worker_is_one_line(folders) -> None:
    train, val = folders
    (val / "1" / "bad.png").write_bytes(b"this is not a png")
    _one_line(_knn(train, val, "--k", "3"), f"cannot read evaluation image {val / '1' / 'bad.png'}")


def test_batch_size_zero_and_out_folder(folders, tmp_path: Path) -> None:
    train, val = folders
    _one_line(_knn(train, val, "--batch-size", "0"), "--batch-size must be >= 1")
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line(_knn(train, val, "--out", str(out)), "is a folder")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
