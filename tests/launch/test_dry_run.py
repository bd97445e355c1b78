"""`submit.py --dry-run`: the same Slurm checks as a real submission (or a line saying they were
skipped), and what would run: the dinosys command, the config file, the task layout, the run
directory with the job id shown as such."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"


def _submit(*argv: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *argv], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def _no_slurm_env(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"  # a PATH without the Slurm clients
    bin_dir.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": str(bin_dir)}
    env.pop("SLURM_CONF", None)
    return env


def test_dry_run_without_slurm_says_it_skipped_the_checks_and_what_would_run(tmp_path) -> None:
    res = _submit("train", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                  "--dry-run", "--", "vitl14", env=_no_slurm_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    run_dir = str(tmp_path.resolve() / "runs" / "dinov2_vitl14-<job id>")
    assert f"run directory: {run_dir}  (<job id>: the Slurm job id, known at submission)" in out
    assert f"config: {REPO / 'configs' / 'train' / 'vitl14.yaml'}" in out
    assert any(line.startswith(f"resolved config: {run_dir}/submission/config.yaml")
               for line in out)
    assert ("job train: 2 node(s) x 4 task(s) = 8 task(s), 4 GPU(s) per node, one task per GPU"
            in out)
    assert (f"  command: dinosys train '{run_dir}/submission/config.yaml' --out '{run_dir}'"
            in out)
    [skipped] = [line for line in out if line.startswith("Slurm checks:")]
    assert skipped.startswith("Slurm checks: SKIPPED (no Slurm found: `sbatch` is not on PATH")
    summary = json.loads(out[-1])
    assert summary == {"dry_run": True, "run_dir": run_dir, "slurm_checked": False}
    assert "%j" not in res.stdout.split("# ----")[0]
    assert not (tmp_path / "runs").exists()


def test_dry_run_of_a_curation_names_every_stage_command(tmp_path) -> None:
    res = _submit("curate", "--parts", "3", "--dry-run", "--", "photos_demo",
                  env=_no_slurm_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert "job curate embed: array of 3 job(s) x 1 task, CPU only" in out
    assert any(line.startswith("  command: dinosys-curate embed ") and
               line.endswith("--no-progress --part '<array index>/3'") for line in out)
    assert "job curate run: 1 node(s) x 1 task(s) = 1 task(s), CPU only" in out


@pytest.mark.slurm
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs the Slurm client commands")
def test_unknown_partition_is_an_error_in_the_dry_run_as_in_a_real_submit(tmp_path) -> None:
    for extra in (["--dry-run"], []):
        res = _submit("train", "--partition", "no_such_partition", "--out",
                      str(tmp_path / "run"), *extra, "--", "mnist_tiny_cpu", cwd=tmp_path)
        assert res.returncode == 2, (extra, res.stdout, res.stderr)
        assert "unknown Slurm partition 'no_such_partition'" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()
    res = _submit("train", "--partition", "debug", "--dry-run", "--", "mnist_tiny_cpu",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Slurm checks: passed (controller answers, partition 'debug' exists)" in res.stdout
    assert json.loads(res.stdout.splitlines()[-1])["slurm_checked"] is True
