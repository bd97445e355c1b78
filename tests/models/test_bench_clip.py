"""tools/bench_clip.py: ours and open_clip's training step on the same towers; JSON last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_clip.py"


def test_bench_clip_runs_both_and_prints_json():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--batch", "4", "--rounds", "1",
                           "--steps", "1", "--warmup", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("ours") for line in lines[:-1])
    # the same towers: identical parameter counts, both stepped
    assert result["params"]["ours"] == result["params"]["open_clip"] > 0
    assert result["samples_per_s"]["ours"] > 0 and result["samples_per_s"]["open_clip"] > 0
    assert result["ratio"] == round(result["samples_per_s"]["ours"]
                                    / result["samples_per_s"]["open_clip"], 3) or \
        abs(result["ratio"] - result["samples_per_s"]["ours"]
            / result["samples_per_s"]["open_clip"]) < 0.01
    assert result["device"].startswith("cpu") and result["batch"] == 4
