"""tools/bench_curation_scale.py at CI size: the split dedup through real part processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_scale_bench_small(tmp_path: Path, repo_root: Path) -> None:
    proc = subprocess.run([sys.executable, str(repo_root / "tools" / "bench_curation_scale.py"),
                           "--n", "20000", "--parts", "2", "--nprobe", "8",
                           "--work", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["n"] == 20000 and res["parts"] == 2 and len(res["part_peak_rss_gib"]) == 2
    assert res["max_part_peak_rss_gib"] < 4.0
    assert res["planted_pairs"] > 500 and res["recall_planted"] >= 0.97
    assert res["index_seconds"] > 0 and res["merge_seconds"] > 0
    assert not tmp_path.joinpath("work").exists()  # removed unless --keep
