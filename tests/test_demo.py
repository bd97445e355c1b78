"""`dinosys demo`: the whole factory on the embedded data (configs/pipeline/demo.yaml), with its
targets. Runs for minutes (the tiny chain with the same stages: tests/factory/test_chain.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinosys.cli import main


@pytest.mark.slow
def test_demo_meets_its_targets(builtin_data: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--data", str(builtin_data)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert set(summary["checks"]) >= {"teacher kNN top-1", "student small kNN top-1",
                                      "zero-shot top-1", "planted val copies kept",
                                      "planted near-duplicates removed"}
    missed = {k: v for k, v in summary["checks"].items() if not v["ok"]}
    assert not missed, missed
    assert "stage" in printed and "pretrain" in printed
    for name in ("teacher", "small", "text"):
        assert json.loads((out / "export" / name / "config.json").read_text())["provenance"]
