"""A training run followed from its log (stderr not a terminal, as in a Slurm log): one plain
progress line per logged step (step/total, loss, images/s, elapsed, ETA); every metrics.jsonl
record carries wall-clock time, elapsed seconds and an ETA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"train: (\d+)/6 step \((\d+)%\) [\d.e+-]+ step/s, elapsed \d+:\d\d, "
                  r"ETA (\d+):(\d\d), loss=\d+\.\d{3}, images_per_s=[\d.e+]+")


def test_log_has_progress_lines_and_metrics_have_time_and_eta(tmp_path, tiny_args) -> None:
    run = tmp_path / "run"
    args = tiny_args("max_steps=6", "log.every_n_steps=2", "log.progress=true")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "dinosys.cli", "train", "mnist_tiny_cpu",
                          "--out", str(run), *args], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "\r" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("train: ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"], lines
    for line in lines:
        assert LINE.fullmatch(line), line
    assert LINE.fullmatch(lines[-1]).group(3, 4) == ("0", "00")  # nothing left at the end
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    for r in steps:
        assert datetime.fromisoformat(r["time"]).tzinfo is not None
    elapsed = [r["elapsed_s"] for r in steps]
    assert 0 < elapsed[0] < elapsed[1] < elapsed[2]
    assert steps[0]["eta_s"] > 0 and steps[-1]["eta_s"] == 0
    # ETA = remaining steps at the average rate so far
    assert abs(steps[0]["eta_s"] - 4 * elapsed[0] / 2) < 0.2
