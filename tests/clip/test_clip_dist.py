"""The clip task on 2 ranks (torchrun, gloo, FSDP2 on CPU): a trained tower and LiT with a
frozen backbone both train and export; SigLIP (and CLIP) steps on 2 ranks equal one process on
the same global batch, losses and weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.clip.conftest import TRAINED_TOWER, clip_yaml

FIXED_BATCH_WORKER = Path(__file__).with_name("fixed_batch_worker.py")


@pytest.mark.dist
@pytest.mark.parametrize("variant", ["clip_trained", "clip_lit"])
def test_two_ranks_train_and_export(tmp_path, builtin_data, tiny_export, repo_root, variant):
    if variant == "clip_trained":
        config = clip_yaml(tmp_path, builtin_data / "shards" / "mnist", TRAINED_TOWER,
                           "loss: {kind: clip}")
    else:
        config = clip_yaml(tmp_path, builtin_data / "shards" / "mnist",
                           f"{{locked: {tiny_export}, trainable_blocks: 1}}")
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


def _run_fixed(tmp_path: Path, repo_root: Path, data: Path, kind: str, ranks: int) -> Path:
    run = tmp_path / f"{kind}_{ranks}"
    python_path = os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(ranks)] if ranks > 1 else [sys.executable])
    proc = subprocess.run([*launch, str(FIXED_BATCH_WORKER), str(run), kind, str(data)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return run


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["siglip", pytest.param("clip", marks=pytest.mark.slow)])
def test_two_ranks_equal_one_process(tmp_path, builtin_data, repo_root, kind):
    """3 steps through run_train (FSDP2, clipping, AdamW, the logged logit scale/bias) on a
    fixed global batch of 8 with repeated captions: per-step loss and the exported weights of 2
    ranks (4 rows each) equal one process (8 rows). Before the loop accumulated its logs ahead
    of backward, SigLIP crashed here: its logged logit bias was a view of FSDP2's unsharded
    parameter, whose storage is freed after backward."""
    data = builtin_data / "shards" / "mnist"
    one, two = (_run_fixed(tmp_path, repo_root, data, kind, n) for n in (1, 2))
    records = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (one, two)]
    losses = [[r["loss"] for r in recs if "loss" in r] for recs in records]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[0][0] != pytest.approx(losses[0][-1], rel=1e-2)  # it trained
    if kind == "siglip":
        bias = [[r["logit_bias"] for r in recs if "logit_bias" in r] for recs in records]
        assert bias[0] == pytest.approx(bias[1], abs=1e-6) and bias[0][-1] != -10.0
    a, b = (load_file(run / "export" / "clip" / "model.safetensors") for run in (one, two))
    assert a.keys() == b.keys() and "logit_scale" in a
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-5, key
