"""tools/mutation_check.py: a mutant is applied to a copy (never to the tree), killed or not by
its covering tests, stale mutants are errors, and the exit code follows the kill ratio."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "mutation_check.py"
KNN = "dinosys/eval/knn.py"
TOP5 = "hit5 = (ranked[:, :5] == val_labels[:, None])"
TOP5_BUG = "hit5 = (ranked[:, :1] == val_labels[:, None])"


def run_tool(tmp_path: Path, mutants: list[dict], *args: str) -> tuple[int, str, dict]:
    path = tmp_path / "mutants.yaml"
    path.write_text(yaml.safe_dump({"mutants": mutants}))
    proc = subprocess.run([sys.executable, str(TOOL), "--mutants", str(path), *args],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, proc.stdout + proc.stderr, json.loads(lines[-1]) if lines else {}


def test_killed_survived_and_the_tree_untouched(tmp_path: Path) -> None:
    before = hashlib.sha256((REPO / KNN).read_bytes()).hexdigest()
    mutants = [
        {"id": "top5-killed", "file": KNN, "original": TOP5, "replacement": TOP5_BUG,
         "tests": ["tests/eval/test_knn_top5.py"]},
        # the same bug against tests that do not look at kNN: must be reported as a survivor
        {"id": "top5-unseen", "file": KNN, "original": TOP5, "replacement": TOP5_BUG,
         "tests": ["tests/curation/test_dedup_thresholds.py"]},
        {"id": "same-value", "file": KNN, "original": "k = min(k, len(train_feats))",
         "replacement": "k = min(len(train_feats), k)", "equivalent": "min is symmetric"},
    ]
    code, out, result = run_tool(tmp_path, mutants, "--no-baseline", "--jobs", "2")
    assert code == 1, out  # 1 of 2 counted mutants killed: below 95%
    assert result["killed"] == 1 and result["survived"] == 1 and result["equivalent"] == 1
    assert result["kill_ratio"] == 0.5 and result["survivors"] == ["top5-unseen"]
    assert "SURVIVOR top5-unseen" in out and "KILLED     top5-killed" in out
    assert hashlib.sha256((REPO / KNN).read_bytes()).hexdigest() == before

    code, out, result = run_tool(tmp_path, mutants[:1] + mutants[2:], "--no-baseline")
    assert code == 0 and result["kill_ratio"] == 1.0, out


def test_stale_mutants_are_errors_not_skipped(tmp_path: Path) -> None:
    mutants = [
        {"id": "gone", "file": KNN, "original": "no such code", "replacement": "x",
         "tests": ["tests/eval/test_knn_top5.py"]},
        {"id": "twice", "file": KNN, "original": "k", "replacement": "j",
         "tests": ["tests/eval/test_knn_top5.py"]},
        {"id": "moved", "file": "dinosys/eval/no_such_module.py", "original": "a",
         "replacement": "b", "tests": ["tests/eval/test_knn_top5.py"]},
        {"id": "untested", "file": KNN, "original": TOP5, "replacement": TOP5_BUG,
         "tests": ["tests/eval/no_such_test.py"]},
    ]
    code, out, result = run_tool(tmp_path, mutants, "--list")
    assert code == 1 and result["stale"] == ["gone", "twice", "moved", "untested"], out
    assert "found 0 times" in out and "file not found" in out and "test not found" in out
    code, out, result = run_tool(tmp_path, mutants[:1], "--no-baseline")
    assert code == 1 and result["errors"] == 1 and result["stale"] == ["gone"], out


@pytest.mark.parametrize("entry, message", [
    ({"id": "a", "file": KNN, "original": "x", "replacement": "y"}, "'tests' must list"),
    ({"id": "a", "file": KNN, "original": "x", "replacement": "x", "tests": ["t"]},
     "replacement equals original"),
    ({"id": "a", "file": KNN, "original": "x", "replacement": "y", "tests": ["t"], "bad": 1},
     "unknown keys"),
])
def test_malformed_lists_are_refused(tmp_path: Path, entry: dict, message: str) -> None:
    code, out, _ = run_tool(tmp_path, [entry], "--list")
    assert code == 2 and message in out


def test_the_shipped_list_applies_to_this_tree() -> None:
    proc = subprocess.run([sys.executable, str(TOOL), "--list"], capture_output=True, text=True,
                          timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["errors"] == 0, proc.stdout[-3000:]
    assert result["mutants"] >= 40
