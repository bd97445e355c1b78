"""launch/submit.py without a cluster: flag mapping, sbatch script, validation, error paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.jobs import prepare_jobs, split_config_args
from launch.params import default_parts, slurm_parameters
from launch.submit import build_parser, split_argv

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"


def _submit(*argv: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *argv], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def _without_slurm(tmp_path: Path) -> dict:
    """An environment without the Slurm clients: the dry run skips the cluster checks (a
    partition 'gpu' would be unknown to the local test cluster)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": str(bin_dir)}
    env.pop("SLURM_CONF", None)
    return env


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.fixture()
def tiny_yaml(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("_base_: mnist_tiny_cpu\nname: tinyx\nmax_steps: 4\n")
    return path


def test_dry_run_maps_every_flag_to_sbatch(tiny_yaml, tmp_path) -> None:
    res = _submit("train", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                  "--timeout-min", "2880", "--account", "vision", "--qos", "high",
                  "--constraint", "h100", "--exclude", "n[01-02]", "--comment", "dinov2 L",
                  "--mem-gb", "480", "--cpus-per-task", "12", "--signal-delay-s", "120",
                  "--name", "vitl", "--out", str(tmp_path / "run"), "--dry-run",
                  "--", str(tiny_yaml), "optim.epochs=3", env=_without_slurm(tmp_path))
    assert res.returncode == 0, res.stderr
    lines = set(res.stdout.splitlines())
    for flag in ("--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=8", "--partition=gpu",
                 "--time=2880", "--account=vision", "--qos=high", "--constraint=h100",
                 "--exclude='n[01-02]'", "--comment='dinov2 L'", "--mem=480GB",
                 "--cpus-per-task=12", "--signal=USR2@120", "--job-name=vitl", "--requeue"):
        assert f"#SBATCH {flag}" in lines, flag
    assert any(line.startswith("srun --unbuffered") and "submitit.core._submit" in line
               for line in lines)
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_parameters_one_task_per_gpu_or_cpu_slot(tiny_yaml) -> None:
    [job] = prepare_jobs("train", [str(tiny_yaml)])
    gpu = slurm_parameters(_args("train", "--nodes", "2", "--gpus-per-node", "4"), job)
    assert (gpu["nodes"], gpu["ntasks_per_node"], gpu["gpus_per_node"]) == (2, 4, 4)
    cpu = slurm_parameters(_args("train", "--tasks-per-node", "2"), job)
    assert (cpu["nodes"], cpu["ntasks_per_node"]) == (1, 2) and "gpus_per_node" not in cpu
    assert cpu["signal_delay_s"] == 90 and cpu["additional_parameters"] == {"requeue": True}
    assert cpu["job_name"] == "dinosys-train-tinyx"
    assert "partition" not in cpu  # Slurm's default partition


def test_single_task_jobs_and_curation_parts() -> None:
    args = _args("curate", "--nodes", "2", "--gpus-per-node", "4")
    assert default_parts(args) == 8
    assert default_parts(_args("curate", "--parts", "3")) == 3


def test_resolved_config_travels_with_the_job(tiny_yaml) -> None:
    [job] = prepare_jobs("train", [str(tiny_yaml), "optim.base_lr=0.001"])
    assert job.handles_preemption and job.distributed
    cfg = job.work.args[0]  # the resolved SSLConfig, not the YAML path
    assert cfg.name == "tinyx" and cfg.optim.base_lr == 0.001 and cfg.max_steps == 4
    assert "base_lr: 0.001" in job.resolved_config


def test_split_arguments() -> None:
    assert split_argv(["train", "--nodes", "2", "--", "cfg", "a=1"]) == (
        ["train", "--nodes", "2"], ["cfg", "a=1"])
    assert split_config_args(["cfg", "a=1", "b.c=2"], "train") == ("cfg", ["a=1", "b.c=2"])


@pytest.mark.parametrize("argv, message", [
    (["train", "--"], "needs a CONFIG"),
    (["train", "--", "no_such_recipe"], "config file not found"),
    (["train", "--", "mnist_tiny_cpu", "optim.epochz=3"], "did you mean 'optim.epochs'"),
    (["train", "--", "mnist_tiny_cpu", "optim.epochs=many"], "optim.epochs"),
    (["train", "--", "mnist_tiny_cpu", "--bogus"], "only key=value"),
    (["train", "--gpus-per-node", "8", "--tasks-per-node", "2", "--", "mnist_tiny_cpu"],
     "one task per GPU"),
    (["train", "--timeout-min", "0", "--", "mnist_tiny_cpu"], "--timeout-min"),
    (["train", "--local", "--nodes", "2", "--", "mnist_tiny_cpu"], "--nodes must be 1"),
    (["train", "--local", "--dry-run", "--", "mnist_tiny_cpu"], "does not combine"),
    (["eval", "--", "knn", "--model", "/no/such/run", "--train", "/tmp", "--val", "/tmp"],
     "--model /no/such/run"),
    (["eval", "--", "knn", "--model", "/tmp"], "required"),
    (["curate", "--", "/no/such.yaml"], "config file not found"),
])
def test_invalid_input_exits_2_with_one_line(argv, message) -> None:
    res = _submit(*argv)
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("launch/submit.py: error:")]
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_capability_not_built_exits_3() -> None:
    from dinosys.train.tasks import task_for_command

    if task_for_command("clip") is not None:
        pytest.skip("dinosys clip is built")
    res = _submit("clip", "--", "whatever.yaml")
    assert res.returncode == 3 and "not built yet" in res.stderr


def test_no_slurm_on_path_exits_2_before_queueing(tiny_yaml, tmp_path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with python but without the Slurm clients
    bin_dir.mkdir()
    env = {**os.environ, "PATH": str(bin_dir)}
    env.pop("SLURM_CONF", None)
    res = _submit("train", "--out", str(tmp_path / "run"), "--", str(tiny_yaml), env=env)
    assert res.returncode == 2 and "no Slurm found: `sbatch` is not on PATH" in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs the Slurm client commands")
def test_unreachable_slurm_conf_exits_2(tiny_yaml, tmp_path) -> None:
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "missing.conf")}
    res = _submit("train", "--out", str(tmp_path / "run"), "--", str(tiny_yaml), env=env)
    assert res.returncode == 2 and "SLURM_CONF=" in res.stderr and "not a readable" in res.stderr
    assert not (tmp_path / "run").exists()


def test_every_training_kind_takes_the_preemption_safe_path(tmp_path, monkeypatch) -> None:
    """train / clip / distill are one path: the kind picks the default task from TASKS, the job
    runs run_train on every rank and checkpoints + requeues on USR2 (handles_preemption)."""
    import functools

    from dinosys.train.tasks import TASKS
    from dinosys.train.tasks.toy import ToyConfig, ToyTask
    from launch.jobs import prepare_jobs, run_train_work

    class ClipLikeToy(ToyTask):
        name = "toy_as_clip"
        command = "clip"

    if any(cls.command == "clip" for cls in TASKS.values()):
        pytest.skip("a real clip task is registered")
    monkeypatch.setitem(TASKS, ClipLikeToy.name, ClipLikeToy)
    config = tmp_path / "toy.yaml"
    config.write_text("data: {sources: [{path: /data/x}]}\n")
    (job,) = prepare_jobs("clip", [str(config), "max_steps=3"])
    assert job.kind == "clip" and job.handles_preemption and job.distributed
    assert isinstance(job.work, functools.partial) and job.work.func is run_train_work
    cfg = job.work.args[0]
    assert type(cfg) is ToyConfig and cfg.task == "toy_as_clip" and cfg.max_steps == 3
    (job,) = prepare_jobs("train", [str(config), "task=toy"])  # any kind runs any task
    assert job.work.args[0].task == "toy" and job.handles_preemption
