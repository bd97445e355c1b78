"""Two real ranks (torchrun, gloo) with DataLoader workers: equal batch counts, no repeats, no gaps
across an interruption, on shards of uneven sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.mark.dist
def test_two_ranks_resume_no_repeats_no_gaps(id_shards: Path, tmp_path: Path) -> None:
    pattern = str(id_shards / "{000000..000002}.tar")  # 7 + 13 + 5 samples
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "loader_rank_worker.py"), pattern, str(tmp_path), "1", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{HERE}"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert [r["batches"] for r in result] == [4, 4] == [r["per_epoch"] for r in result]
    ids = result[0]["ids"] + result[1]["ids"]
    assert len(ids) == 24 and len(set(ids)) == 24 and set(ids) <= set(range(25))
    assert result[0]["state"] == result[1]["state"]
    assert result[0]["state"]["consumed"] == 24 and result[0]["state"]["epoch"] == 0
