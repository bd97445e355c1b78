"""`dinosys eval` as a user runs it: JSON on stdout, bad input as one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dinosys.errors import UserError
from dinosys.eval.registry import run_evaluator

from .conftest import copy_subset

REPO = Path(__file__).resolve().parents[2]


def dinosys(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dinosys.cli", *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO)


def test_linear_cli_prints_and_writes_the_result(tiny_export: Path, small_digits, tmp_path):
    train, val = small_digits
    out = tmp_path / "linear.json"
    res = dinosys("eval", "linear", "--model", str(tiny_export), "--train", str(train),
                  "--val", str(val), "--lrs", "0.01", "0.1", "--n-blocks", "1", "--epochs", "2",
                  "--avgpool", "true", "--out", str(out))
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout.splitlines()[-1])
    assert printed["grid"] == json.loads(out.read_text())["grid"]
    assert [r["variant"] for r in printed["grid"]] == ["blocks1_avgpool"] * 2
    assert printed["command"].startswith(f"dinosys eval linear --model {tiny_export} --train")
    assert "--avgpool true" in printed["command"]
    # a log, not a terminal: plain progress lines, no carriage-return bars
    assert "linear heads: epoch 2/2" in res.stderr and "\r" not in res.stderr
    assert "linear heads: 2/2 step (100%)" in res.stderr
    assert "linear train features: 1/1 batch (100%)" in res.stderr


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr)
    err = res.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("evaluator", ["knn", "linear"])
def test_class_folders_that_differ(evaluator, tiny_export, builtin_data, tmp_path) -> None:
    digits = builtin_data / "digits"
    train = copy_subset(digits / "train", tmp_path / "train", 5, ["0", "1", "2"])
    val = copy_subset(digits / "val", tmp_path / "val", 5, ["0", "1", "3"])
    _one_line_error(dinosys("eval", evaluator, "--model", str(tiny_export), "--train",
                            str(train), "--val", str(val)),
                    "different classes", "only in", "['2']", "['3']")


def test_a_single_class_folder(tiny_export, builtin_data, tmp_path) -> None:
    digits = builtin_data / "digits"
    train = copy_subset(digits / "train", tmp_path / "train", 5, ["4"])
    val = copy_subset(digits / "val", tmp_path / "val", 5, ["4"])
    _one_line_error(dinosys("eval", "linear", "--model", str(tiny_export), "--train", str(train),
                            "--val", str(val)), "1 class folder", "at least two")


def test_more_blocks_than_the_model_has(tiny_export, small_digits) -> None:
    train, val = small_digits
    _one_line_error(dinosys("eval", "linear", "--model", str(tiny_export), "--train", str(train),
                            "--val", str(val), "--n-blocks", "1", "8"),
                    "last 8 blocks", "has 2 blocks")


class GlobalOnly(nn.Module):
    """A model with one global (B, D) feature: no patch tokens, no intermediate layers."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(img_size=28)
        self.proj = nn.Linear(3 * 28 * 28, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1))


def test_a_model_without_the_features_an_evaluator_needs(small_digits) -> None:
    train, val = small_digits
    model = GlobalOnly()
    knn = run_evaluator("knn", model, train=str(train), val=str(val), k=[5])
    assert knn["feature"] == "cls" and knn["feature_dim"] == 16
    with pytest.raises(UserError, match="intermediate layers"):
        run_evaluator("linear", model, train=str(train), val=str(val), n_blocks=[4])
    with pytest.raises(UserError, match="no patch tokens"):
        run_evaluator("linear", model, train=str(train), val=str(val), n_blocks=[1])
    # without the average-pooled variant the global feature is enough
    linear = run_evaluator("linear", model, train=str(train), val=str(val), n_blocks=[1],
                           avgpool=[False], epochs=1, lrs=[0.1])
    assert [r["variant"] for r in linear["grid"]] == ["blocks1"]
    with pytest.raises(UserError, match="needs image features: encode_image"):
        run_evaluator("knn", model, train=str(train), val=str(val), feature="image")
