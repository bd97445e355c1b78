"""Runs that are killed early, rerun with another config, or read damaged data
(issue 18, items 4, 7 and 10)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _train(run: Path, *overrides: str, script: list[str] | None = None
           ) -> subprocess.CompletedProcess:
    head = script or ["-m", "dinosys.cli"]
    return subprocess.run([sys.executable, *head, "train", "mnist_tiny_cpu", "--out", str(run),
                           *overrides], capture_output=True, text=True, env=_env(), timeout=600,
                          cwd=run.parent)


def _steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def test_kill_before_the_first_checkpoint_logs_each_step_once(tiny_args, tmp_path) -> None:
    run = tmp_path / "run"
    args = tiny_args("max_steps=5", "checkpoint.every_n_steps=100")
    killed = _train(run, *args, script=[str(HERE / "train_killed_at_step.py"), "3"])
    assert killed.returncode != 0 and _steps(run) == [1, 2, 3]
    assert not any(p.name.startswith("step_") for p in (run / "checkpoints").glob("*"))
    res = _train(run, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _steps(run) == [1, 2, 3, 4, 5]


def test_changed_config_is_refused_before_config_yaml_is_written(tiny_args, tmp_path) -> None:
    run = tmp_path / "run"
    res = _train(run, *tiny_args("max_steps=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    before = (run / "config.yaml").read_bytes()
    res = _train(run, *tiny_args("max_steps=4", "model.depth=3", "heads.n_prototypes=32"))
    err = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and err.startswith("dinosys: error: "), res.stderr
    assert "model.depth (2 -> 3)" in err and "heads.n_prototypes (64 -> 32)" in err, err
    assert "differs from" in err and str(run / "config.yaml") in err, err
    assert (run / "config.yaml").read_bytes() == before
    from dinosys.export import load

    load(run / "checkpoints")  # the run still loads with its own config


def _damaged_shards(root: Path, builtin_data: Path) -> Path:
    """Four shards of 32 MNIST images (+ sizes.json); the last one is empty: 25 % lost."""
    from dinosys.data.shard_writer import ShardWriter

    images = sorted((builtin_data / "mnist" / "train").rglob("*.png"))[:96]
    with ShardWriter(root, max_count=32) as writer:
        for i, path in enumerate(images):
            writer.write({"__key__": f"m{i:04d}", "png": path.read_bytes(),
                          "cls": path.parent.name.encode()})
    (root / "000003.tar").write_bytes(b"")
    sizes = json.loads((root / "sizes.json").read_text())
    sizes["000003.tar"] = 32
    (root / "sizes.json").write_text(json.dumps(sizes))
    return root


def test_bad_sample_counts_reach_metrics_summary_and_checkpoint(tiny_args, builtin_data,
                                                                 tmp_path) -> None:
    shards = _damaged_shards(tmp_path / "shards", builtin_data)
    run = tmp_path / "run"
    args = tiny_args("max_steps=6", "checkpoint.every_n_steps=3", "data.max_bad_fraction=0.5",
                     f"data.sources=[{{path: {shards}}}]")
    killed = _train(run, *args, script=[str(HERE / "train_killed_at_step.py"), "4"])
    assert killed.returncode != 0
    extra = json.loads((run / "checkpoints" / "step_00000003" / "extra.json").read_text())
    at_3 = extra["bad_samples"]["damaged_shard"]
    assert at_3 > 0
    res = _train(run, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["bad_samples"] for r in records if "loss" in r]
    assert len(logged) == 6 and all("damaged_shard" in b for b in logged[1:])
    totals = [b.get("damaged_shard", 0) for b in logged]
    assert totals == sorted(totals) and totals[2] == at_3  # cumulative across the resume
    assert summary["bad_samples"] == logged[-1] and totals[-1] > at_3
    # about a quarter of what was read is lost: the counts are not per-resume fragments
    read = 6 * 8 + totals[-1]
    assert 0.1 < totals[-1] / read < 0.45, (totals[-1], read)
    final = json.loads((run / "checkpoints" / "step_00000006" / "extra.json").read_text())
    assert final["bad_samples"] == summary["bad_samples"]
