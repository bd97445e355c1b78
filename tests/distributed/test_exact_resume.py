"""Exact resume (acceptance test): 2N steps in one go == N steps, kill -9, resume, N steps.

Two ranks (torchrun, gloo, FSDP2 on CPU), the CPU recipe shrunk to seconds. The schedules are
shortened so that lr warmup, last-layer freezing and the teacher-temperature warmup all cross
the kill point; stochastic depth is on (torch RNG) and the loader runs a worker process.
Losses (metrics.jsonl, every step) must agree to 1e-6 and the final weights exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinosys.distributed.sharded_checkpoint import CheckpointManager, load_backbone_state

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
N = 3
TIMING_KEYS = {"images_per_s", "data_wait_frac", "tflops_per_s", "mfu", "peak_mem_gib", "elapsed_s",
               "eta_s"}


def overrides(data: Path) -> list[str]:
    return [
        f"max_steps={2 * N}", f"checkpoint.every_n_steps={N}", "checkpoint.keep_last=5",
        "log.every_n_steps=1", "log.progress=false",
        "data.batch_size_per_gpu=8", "data.num_workers=1",
        f"data.sources=[{{path: {data}}}]",
        "model.drop_path_rate=0.1", "heads.n_prototypes=256", "heads.hidden_dim=128",
        "heads.bottleneck_dim=64", "crops.n_local=2",
        "optim.iters_per_epoch=2", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=2",
        "loss.warmup_teacher_temp_epochs=2",
    ]


def torchrun(script: list[str], run_dir: Path, data: Path, nproc: int = 2
             ) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []),
           *script, "train", "mnist_tiny_cpu", "--out", str(run_dir), *overrides(data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items()
                            if k not in TIMING_KEYS and isinstance(v, (int, float))}
    return out


@pytest.mark.dist
@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path: Path, builtin_data: Path) -> None:
    data = builtin_data / "mnist" / "train"
    cli = ["-m", "dinosys.cli"]
    full, resumed, one_rank = tmp_path / "full", tmp_path / "resumed", tmp_path / "one_rank"

    done = torchrun(cli, full, data)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    killed = torchrun([str(HERE / "train_until_killed.py"), str(N)], resumed, data)
    assert killed.returncode != 0, "the first half should have been killed"
    manager = CheckpointManager(resumed / "checkpoints")
    assert manager.latest() == resumed / "checkpoints" / f"step_{N:08d}"
    assert [s for s, _ in manager.committed()] == [N]  # nothing after the kill
    assert max(losses(resumed)) == N

    shutil.copytree(resumed, one_rank)  # also resume a copy on a single process, below
    again = torchrun(cli, resumed, data)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    ref, got = losses(full), losses(resumed)
    assert sorted(ref) == sorted(got) == list(range(1, 2 * N + 1))
    for step in ref:
        assert ref[step].keys() == got[step].keys(), step
        for key, value in ref[step].items():
            assert math.isclose(got[step][key], value, rel_tol=1e-6, abs_tol=1e-6), \
                f"step {step} {key}: {got[step][key]} != {value}"
    # the schedules really moved across the kill point (so the test covers them)
    assert ref[1]["lr"] != ref[2 * N]["lr"] and ref[1]["teacher_temp"] != ref[2 * N]["teacher_temp"]

    final = f"step_{2 * N:08d}"
    for prefix in ("teacher.backbone", "student.backbone", "student.dino_head"):
        a = load_backbone_state(full / "checkpoints" / final, prefix=prefix)
        b = load_backbone_state(resumed / "checkpoints" / final, prefix=prefix)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{prefix}.{key}")
        if prefix == "teacher.backbone":
            start = load_backbone_state(full / "checkpoints" / f"step_{N:08d}", prefix=prefix)
            assert any(not torch.equal(start[k], a[k]) for k in a), "weights never changed"

    # a different world size: the 2-rank checkpoint resumes on one process (DCP reshards, the
    # loader re-splits the rest of the epoch, RNGs are re-seeded) and the run finishes
    single = torchrun(cli, one_rank, data, nproc=1)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    summary = json.loads(single.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["step"] == 2 * N
    assert summary["world_size"] == 1
    assert sorted(losses(one_rank)) == list(range(1, 2 * N + 1))
    after = losses(one_rank)
    assert all(after[s] == got[s] for s in range(1, N + 1))  # the history before the kill stays
    assert all(math.isfinite(after[s]["loss"]) for s in after)
