"""tools/bench_train.py runs the real training step and ends with one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tools" / "bench_train.py"
# The crop sizes are set here, not taken from the recipe: mnist_tiny_cpu is retuned from time to
# time (its local crops went 16 -> 21 -> 14 px), and the expected "crops" field must follow what
# the test asked for, not a copy of the recipe that goes stale.
CROPS = {"global_size": 28, "local_size": 14, "n_local": 2}
TINY = ["--config", "mnist_tiny_cpu", "--batch-size", "4", "--warmup", "1", "--steps", "2",
        "heads.n_prototypes=256", "heads.hidden_dim=128", "heads.bottleneck_dim=64",
        *(f"crops.{k}={v}" for k, v in CROPS.items())]
EXPECTED_CROPS = f"2x{CROPS['global_size']}+{CROPS['n_local']}x{CROPS['local_size']}"


def run_bench(args: list[str], nproc: int = 1) -> dict:
    launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *launcher, str(BENCH), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "images_per_s" in proc.stdout.split(lines[-1])[0]  # the readable table comes first
    return json.loads(lines[-1])


def check(result: dict, world: int, fsdp: bool) -> None:
    assert result["steps_timed"] == result["steps_applied"] == 2
    assert result["world_size"] == world and result["fsdp"] is fsdp
    assert result["images_per_s"] > 0 and result["tflops_per_device"] > 0
    assert result["peak_mem_gib"] > 0 and result["last_loss"] is not None
    assert result["arch"] == "vit_tiny" and result["crops"] == EXPECTED_CROPS


def test_bench_single_process_cpu() -> None:
    check(run_bench([*TINY, "--act-ckpt"]), world=1, fsdp=False)


def test_bench_packed_profiled_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench([*TINY, "--pack", "--profile", "1", "--timm-baseline", "--out", str(out)])
    check(result, world=1, fsdp=False)
    assert result["pack"] and json.loads(out.read_text()) == result
    shares = result["profile"]["share"]
    assert set(shares) == {"gemm", "attention", "optimizer", "elementwise", "other", "idle"}
    assert shares["gemm"] > 0 and shares["optimizer"] > 0
    assert "gemm" in out.with_suffix(".profile.txt").read_text()
    assert result["timm"]["status"].startswith("skipped: no timm counterpart")
    # tools/gpu_bench_report.py turns gpu_bench.sh's results.jsonl into the results tables
    (tmp_path / "results.jsonl").write_text(json.dumps({**result, "run": "tiny", "rc": 0})
                                            + "\n" + json.dumps({"run": "oom", "rc": 1}) + "\n")
    report = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_bench_report.py"),
                             str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "| tiny | vit_tiny | 4 | no | yes | no | no |" in report
    assert "| oom | no result (rc 1) |" in report and "tiny profile" in report
    assert "clip: no result (clip.json missing or empty)" in report
    clip = {"size": "b16", "batch": 256, "dtype": "bf16", "device": "cuda", "ratio": 1.4,
            "samples_per_s": {"ours": 1400.0, "open_clip": 1000.0}}
    (tmp_path / "clip.json").write_text(json.dumps(clip) + "\n")
    report = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_bench_report.py"),
                             str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "ours 1400.0 samples/s, open_clip 1000.0, ratio 1.4" in report


@pytest.mark.dist
def test_bench_fsdp_two_ranks_cpu() -> None:
    check(run_bench([*TINY, "--fsdp"], nproc=2), world=2, fsdp=True)


@pytest.mark.gpu
def test_bench_gpu_bf16_fsdp_one_device() -> None:
    result = run_bench([*TINY, "--fsdp", "--dtype", "bf16"])
    check(result, world=1, fsdp=True)
    assert result["device"] != "cpu" and result["peak_mem_reserved_gib"] > 0
