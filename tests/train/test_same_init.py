"""Every rank starts from the weights one process builds (the run seeds ``seed + rank``; FSDP2
broadcasts nothing): sharded, and replicated (``dist.fsdp: false``, where different inits
would stay different replicas)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("same_init_worker.py")


@pytest.mark.dist
@pytest.mark.parametrize("fsdp", ["false", "true"])
def test_ranks_start_from_the_single_process_weights(tmp_path, repo_root, fsdp):
    python_path = os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(WORKER), str(tmp_path), "mnist_tiny_cpu", fsdp]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["checked"] > 10 and result["max_diff"] == 0.0, (rank, result)
