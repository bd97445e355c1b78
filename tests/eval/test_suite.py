"""`dinosys eval suite`: a YAML list of evaluations, results.json and the model card table."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from dinosys.errors import UserError
from dinosys.eval.registry import run_evaluator
from dinosys.eval.suite import CARD_BEGIN, builtin_sets, load_suite

from .test_eval_cli import _one_line_error, dinosys


def test_default_suite_is_knn_and_linear_on_the_embedded_sets(tmp_path: Path) -> None:
    entries = load_suite("default_suite", tmp_path / "data", check_paths=False)
    assert [(e.name, e.evaluator) for e in entries] == [
        ("mnist", "knn"), ("mnist", "linear"), ("digits", "knn"), ("digits", "linear")]
    assert entries[0].config.train == str(tmp_path / "data" / "mnist" / "train")
    assert builtin_sets("default_suite") == ["digits", "mnist"]


@pytest.fixture
def suite_file(tmp_path: Path, small_digits) -> Path:
    train, val = small_digits
    path = tmp_path / "suite.yaml"
    path.write_text(f"""
- name: digits6
  evaluator: knn
  train: {train}
  val: {val}
  k: [5]
- name: digits6
  evaluator: linear
  train: {train}
  val: {val}
  lrs: [0.01, 0.1]
  n_blocks: [1, 2]
  epochs: 2
""")
    return path


def test_suite_writes_results_and_the_model_card(tiny_export: Path, suite_file: Path,
                                                 tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_export, model)
    res = dinosys("eval", "suite", "--model", str(model), "--suite", str(suite_file))
    assert res.returncode == 0, res.stderr[-3000:]
    printed = json.loads(res.stdout.splitlines()[-1])
    saved = json.loads((model / "eval" / "results.json").read_text())
    assert printed["metrics"] == saved["metrics"]
    assert set(saved["metrics"]) == {"digits6/knn/top1_k5", "digits6/knn/top5_k5",
                                     "digits6/linear/top1", "digits6/linear/holdout_top1",
                                     "digits6/linear/top5"}
    card = (model / "README.md").read_text()
    assert card.count("## Evaluation results") == 1 and card.count(CARD_BEGIN) == 1
    knn_row = next(line for line in card.splitlines() if line.startswith("| digits6 | knn |"))
    assert f"top1_k5 {saved['metrics']['digits6/knn/top1_k5']:.4f}" in knn_row
    # the command in the card reproduces the number
    command = knn_row.split("`")[1]
    words = shlex.split(command)
    assert words[:3] == ["dinosys", "eval", "knn"]
    again = dinosys(*words[1:])
    assert json.loads(again.stdout.splitlines()[-1])["metrics"]["top1_k5"] == \
        saved["metrics"]["digits6/knn/top1_k5"]
    # train and val extracted once (blocks of the last 2), kNN's and the probe's 4 requests
    # served from them: the probe's command reproduces its number too
    assert {k: saved["features"][k] for k in ("extractions", "served")} == \
        {"extractions": 2, "served": 4}
    linear_row = next(line for line in card.splitlines() if line.startswith("| digits6 | linear"))
    linear = json.loads(dinosys(*shlex.split(linear_row.split("`")[1])[1:]).stdout.splitlines()[-1])
    assert linear["metrics"]["top1"] == saved["metrics"]["digits6/linear/top1"]
    # a second run replaces the table instead of adding one
    assert dinosys("eval", "suite", "--model", str(model), "--suite",
                   str(suite_file)).returncode == 0
    card = (model / "README.md").read_text()
    assert card.count("## Evaluation results") == 1 and card.count(CARD_BEGIN) == 1
    assert card.startswith("# ") and "## Loading" in card  # the rest of the card is kept


def test_suite_on_a_random_baseline_writes_nothing_beside_it(suite_file: Path) -> None:
    result = run_evaluator("suite", "random:vit_tiny:28", suite=str(suite_file))
    assert result["results_json"] is None and result["model_card"] is None
    assert [r["evaluator"] for r in result["results"]] == ["knn", "linear"]


@pytest.mark.parametrize("text, message", [
    ("- evaluator: knnn\n", "unknown evaluator 'knnn'"),
    ("- evaluator: knn\n  train: /tmp\n  val: /tmp\n  kk: 3\n", "entry 1 (knn)"),
    ("- evaluator: knn\n  train: /tmp\n", "entry 1 (knn)"),
    ("evaluator: knn\n", "non-empty YAML list"),
    ("- evaluator: suite\n", "cannot run another suite"),
])
def test_bad_suites_are_one_line(tiny_export: Path, tmp_path: Path, text: str,
                                 message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    _one_line_error(dinosys("eval", "suite", "--model", str(tiny_export), "--suite", str(path)),
                    message)
    with pytest.raises(UserError):
        load_suite(str(path), tmp_path)
