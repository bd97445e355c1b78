"""`dinosys pipeline`: stage order, completion records (skip, refuse a changed stage), one stage
at a time, a killed stage resuming from its checkpoint, bad configs in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dinosys.cli import main
from dinosys.errors import UserError
from dinosys.factory.record import read_record
from dinosys.factory.runner import load_pipeline, run_pipeline, stage_complete
from dinosys.factory.stages import Context, plan
from dinosys.factory.stages_data import curate_argv
from tests.factory.conftest import write_mini

REPO = Path(__file__).resolve().parents[2]


def test_shipped_pipelines_plan_each_stage_after_its_inputs() -> None:
    demo = plan(load_pipeline("demo"))
    order = [row["stage"] for row in demo]
    assert order == ["pool", "curate", "pretrain", "distill", "text_align", "evaluate", "export"]
    for i, row in enumerate(demo):
        assert set(row["inputs"]) <= set(order[:i])
    assert demo[2]["collective"] and not demo[1]["collective"]
    cluster = {row["stage"]: row for row in plan(load_pipeline("vitg14_factory"))}
    assert "pool" not in cluster and cluster["curate"]["inputs"] == []
    assert cluster["curate"]["resources"]["parts"] > 1
    assert cluster["pretrain"]["resources"]["gpus_per_node"] == 8


@pytest.mark.parametrize("override, words", [
    ("pretrain.recipee=x", "did you mean 'pretrain.recipe'"),
    ("pretrain.recipe=null", "stage pretrain is enabled but names no recipe"),
    ("pool.kind=lots", "pool.kind"),
    ("pretrain.resources.nodes=0", "'pretrain.resources.nodes': must be >= 1"),
])
def test_bad_config_is_one_line_exit_2(override: str, words: str,
                                       capsys: pytest.CaptureFixture) -> None:
    assert main(["pipeline", "demo", "--plan", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def test_rerun_skips_complete_stages_and_refuses_a_changed_one(
        mini_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pipe"
    first = run_pipeline(load_pipeline(str(mini_config)), out)
    assert {k: v["status"] for k, v in first["stages"].items()} == {"pretrain": "ran",
                                                                    "export": "ran"}
    record = read_record(out, "pretrain")
    assert record["steps"] == 4 and Path(record["export"], "model.safetensors").is_file()
    weights = out / "export" / "teacher" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = run_pipeline(load_pipeline(str(mini_config)), out)
    assert {v["status"] for v in again["stages"].values()} == {"skipped"}
    assert weights.stat().st_mtime_ns == stamp
    cfg = load_pipeline(str(mini_config))
    assert stage_complete(cfg, out, "export") and not stage_complete(cfg, tmp_path / "x", "export")
    assert json.loads((out / "summary.json").read_text())["stages"]["pretrain"][
        "recorded_seconds"] == record["seconds"]
    # a stage asked for alone needs its inputs complete; the changed stage is refused
    assert main(["pipeline", str(mini_config), "--out", str(tmp_path / "new"), "--stage",
                 "export"]) == 2
    assert "needs stage pretrain complete" in capsys.readouterr().err
    rc = main(["pipeline", str(mini_config), "--out", str(out), "--stage", "pretrain",
               "pretrain.resources.timeout_min=5"])  # resources are not part of the digest
    assert rc == 0 and '"status": "skipped"' in capsys.readouterr().out
    changed = write_mini(tmp_path / "changed.yaml", Path(load_pipeline(str(mini_config)).data),
                         steps=5)
    assert main(["pipeline", str(changed), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stage pretrain" in err and "another configuration" in err
    with pytest.raises(UserError, match="another configuration"):
        stage_complete(load_pipeline(str(changed)), out, "pretrain")
    # a bad key in a stage's overrides stops the pipeline before any stage runs
    assert main(["pipeline", str(mini_config), "--out", str(tmp_path / "bad"),
                 "export.enabled=false", "pretrain.overrides=[optim.bse_lr=1]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stage pretrain" in err and "optim.base_lr" in err
    assert not (tmp_path / "bad").exists()


def test_curate_arguments_wire_the_pool_and_the_part(tmp_path: Path) -> None:
    cfg = load_pipeline("demo", ["data=/data/builtin"])
    ctx = Context(cfg, tmp_path, {"pool": {"pool": "/p/shards", "digest": "d"}}, (2, 4))
    argv = curate_argv(ctx, "embed")
    assert argv[:5] == ["embed", "mnist_demo", "--out", str(tmp_path / "curate"),
                        "--no-progress"]
    assert 'sources=[{path: "/p/shards", name: pool}]' in argv
    assert 'dedup.eval_sources=[{path: "/data/builtin/mnist/val", name: mnist_val}]' in argv
    assert argv[-2:] == ["--part", "2/4"]


def test_a_killed_training_stage_resumes_from_its_checkpoint(builtin_data: Path,
                                                             tmp_path: Path) -> None:
    # 200 steps: the kill lands long before the end even when the poll wakes late
    config = write_mini(tmp_path / "mini.yaml", builtin_data, steps=200, every=5)
    out = tmp_path / "pipe"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dinosys.cli", "pipeline", str(config), "--out", str(out)]
    proc = subprocess.Popen([*cmd, "--stage", "pretrain"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "pretrain" / "checkpoints" / "latest"
    deadline = time.time() + 120
    def latest_step() -> int:  # the pointer names e.g. step_00000010 (0: none yet)
        digits = re.findall(r"\d+", latest.read_text()) if latest.is_file() else []
        return int(digits[-1]) if digits else 0

    while time.time() < deadline and latest_step() < 10:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.is_file(), "no checkpoint within 120 s"
    assert read_record(out, "pretrain") is None
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from step" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished"
    assert read_record(out, "pretrain")["steps"] == 200
    steps = [json.loads(line)["step"] for line in
             (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 200 and len(steps) == len(set(steps))  # every step logged once


def test_independent_stages_run_at_once_with_the_same_digests(builtin_data: Path,
                                                              tmp_path: Path) -> None:
    # with curate off, the pool and pretraining need nothing: --jobs 2 runs them together,
    # each as `dinosys pipeline OUT/pipeline.yaml --stage NAME`
    config = write_mini(tmp_path / "mini.yaml", builtin_data, steps=2, extra=(
        "pool: {kind: mnist_planted, near_duplicates: 2, contamination: 2}"))
    out = tmp_path / "pipe"
    first = run_pipeline(load_pipeline(str(config)), out, jobs=2)
    assert {k: v["status"] for k, v in first["stages"].items()} == {
        "pool": "ran", "pretrain": "ran", "export": "ran"}
    assert (out / "pipeline.yaml").is_file()
    assert first["stages"]["pretrain"]["cpu_seconds"] > 0
    assert read_record(out, "pool")["images"] == 4004
    again = run_pipeline(load_pipeline(str(config)), out)  # one process: same digests
    assert {v["status"] for v in again["stages"].values()} == {"skipped"}


@pytest.mark.dist
def test_a_training_stage_runs_on_every_rank_of_a_torchrun_job(mini_config: Path,
                                                               tmp_path: Path) -> None:
    from tests.train.test_dist_train import torchrun

    out = tmp_path / "pipe"
    args = ["-m", "dinosys.cli", "pipeline", str(mini_config), "--out", str(out)]
    proc = torchrun([*args, "--stage", "pretrain"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = read_record(out, "pretrain")
    assert record["summary"]["world_size"] == 2 and record["steps"] == 4
    statuses = [json.loads(line)["status"] for line in proc.stdout.splitlines()
                if line.startswith("{")]
    assert statuses == ["ran"]  # rank 0 records and prints the one summary; rank 1 only trains
    refused = torchrun([*args, "--stage", "export"], timeout=120)
    # each rank exits 2 with the one-line error; torchrun itself then reports a failure
    assert refused.returncode != 0 and "runs in one process; it got 2 ranks" in refused.stderr
