"""`dinosys clip` / `submit.py clip` / export and eval commands: one path, one-line errors."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from tests.clip.conftest import TRAINED_TOWER, clip_yaml

REPO = Path(__file__).resolve().parents[2]


def _error_lines(res: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    return [line for line in res.stderr.splitlines() if line.startswith("dinosys: error")]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dinosys.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_submit_clip_is_the_preemption_safe_training_path(tmp_path, builtin_data):
    from dinosys.train.tasks.clip import ClipRunConfig
    from launch.jobs import prepare_jobs, run_train_work

    config = clip_yaml(tmp_path, builtin_data / "shards" / "mnist", TRAINED_TOWER)
    (job,) = prepare_jobs("clip", [str(config), "max_steps=3"])
    assert job.kind == "clip" and job.handles_preemption and job.distributed
    assert isinstance(job.work, functools.partial) and job.work.func is run_train_work
    cfg = job.work.args[0]
    assert type(cfg) is ClipRunConfig and cfg.task == "clip" and cfg.max_steps == 3


def test_bad_input_is_one_line_exit_2(tmp_path, builtin_data, tiny_export):
    missing = clip_yaml(tmp_path, builtin_data / "shards" / "mnist",
                        f"{{locked: {tmp_path / 'no_such_run'}}}")
    res = _cli("clip", str(missing), "--out", str(tmp_path / "r1"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = _error_lines(res)
    assert "model.image.locked" in line and "no_such_run" in line
    # a LiT model has no open_clip form: the export says so in one line, writes nothing
    lit = clip_yaml(tmp_path, builtin_data / "shards" / "mnist",
                    f"{{locked: {tiny_export}, trainable_blocks: 1}}")
    res = _cli("clip", str(lit), "--out", str(tmp_path / "lit"), "max_steps=1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    res = _cli("export", "--model", str(tmp_path / "lit"), "--out", str(tmp_path / "exp"),
               "--format", "native,open_clip", cwd=tmp_path)
    assert res.returncode == 2 and "open_clip cannot express a LiT image tower" in res.stderr
    assert len(_error_lines(res)) == 1 and not (tmp_path / "exp").exists()
    # zero-shot: an empty template file, a model without a text tower
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    val = builtin_data / "digits" / "val"
    res = _cli("eval", "zeroshot", "--model", str(tmp_path / "lit"), "--val", str(val),
               "--templates", str(empty), cwd=tmp_path)
    assert res.returncode == 2 and "no templates" in res.stderr
    res = _cli("eval", "zeroshot", "--model", str(tiny_export), "--val", str(val),
               cwd=tmp_path)
    assert res.returncode == 2 and "needs an image-text model" in res.stderr
    assert len(_error_lines(res)) == 1
