"""The clip task on 2 ranks (torchrun, gloo, FSDP2 on CPU): a trained tower and LiT with a
frozen backbone both train and export. (loss.kind=siglip on 2 ranks in this loop currently ends
in a SIGSEGV in the first backward on CPU/gloo, with the exchange and with a gather-based
variant alike, while the same model + loss + FSDP2 outside the loop works: open, see the report;
the SigLIP loss itself is checked against the single-process loss on 2 and 4 ranks in
tests/losses.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.clip.conftest import TRAINED_TOWER, clip_yaml


@pytest.mark.dist
@pytest.mark.parametrize("variant", ["clip_trained", "clip_lit"])
def test_two_ranks_train_and_export(tmp_path, builtin_data, locked_export, repo_root, variant):
    if variant == "clip_trained":
        config = clip_yaml(tmp_path, builtin_data / "shards" / "mnist", TRAINED_TOWER,
                           "loss: {kind: clip}")
    else:
        config = clip_yaml(tmp_path, builtin_data / "shards" / "mnist",
                           f"{{locked: {locked_export}, trainable_blocks: 1}}")
    python_path = os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "dinosys.cli", "clip", str(config), "--out", str(tmp_path / "run"),
           "max_steps=3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["world_size"] == 2
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl")
              .read_text().splitlines() if "loss" in json.loads(x)]
    assert len(losses) == 3 and all(v == v and v > 0 for v in losses)
    from dinosys.export import load

    model = load(tmp_path / "run")
    assert model.is_locked == (variant == "clip_lit")
