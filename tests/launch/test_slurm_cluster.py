"""The local Slurm cluster (tools/slurm_local.sh) runs real multi-task jobs, plain and submitit."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "slurm_local.sh"

pytestmark = pytest.mark.slurm


def _gloo_all_reduce() -> dict:
    """Runs in each Slurm task: join a gloo group from the Slurm environment, sum the ranks."""
    import submitit
    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    try:
        value = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(value)
        return {"rank": env.rank, "world_size": env.world_size, "sum": value.item(),
                "procid": int(os.environ["SLURM_PROCID"]), "job_id": os.environ["SLURM_JOB_ID"]}
    finally:
        dist.destroy_process_group()


def test_srun_two_tasks_print_their_procid() -> None:
    out = subprocess.run(
        ["srun", "--ntasks=2", "--time=2", "bash", "-c",
         "echo procid=$SLURM_PROCID of $SLURM_NTASKS"],
        capture_output=True, text=True, timeout=90, check=True,
    ).stdout
    assert sorted(line.strip() for line in out.splitlines()) == ["procid=0 of 2", "procid=1 of 2"]


def test_sbatch_two_tasks(tmp_path) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo procid=$SLURM_PROCID'\n")
    out_file = tmp_path / "out.txt"
    subprocess.run(
        ["sbatch", "--wait", "--ntasks=2", "--time=2", f"--output={out_file}", str(script)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lines = sorted(line.strip() for line in out_file.read_text().splitlines() if line.strip())
    assert lines == ["procid=0", "procid=1"]


def test_submitit_two_tasks_gloo_all_reduce(tmp_path) -> None:
    import cloudpickle
    import submitit

    # the job imports this function by value: the test module is not importable in the job
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(nodes=1, tasks_per_node=2, cpus_per_task=1, timeout_min=3,
                               slurm_partition="debug", name="dinosys-gloo-check")
    job = executor.submit(_gloo_all_reduce)
    results = _wait_results(job, 150)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in results)
    assert [r["procid"] for r in results] == [r["rank"] for r in results]
    assert len({r["job_id"] for r in results}) == 1


def _wait_results(job, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            raise TimeoutError(f"submitit job {job.job_id} not done after {timeout_s}s")
        time.sleep(1)
    return job.results()


def test_second_private_cluster_start_is_idempotent_and_stop_cleans_up() -> None:
    """A second cluster on other ports beside the test cluster: start, start again, run, stop."""
    # munged runs as the munge user: every parent of its directory must be world-searchable,
    # which pytest's private tmp_path is not
    tmp_path = Path(tempfile.mkdtemp(prefix="dinosys-slurm-test-", dir="/tmp"))
    tmp_path.chmod(0o755)
    env = {**os.environ, "DINOSYS_SLURM_DIR": str(tmp_path / "cluster2"),
           "DINOSYS_SLURMCTLD_PORT": "16917", "DINOSYS_SLURMD_PORT": "16918",
           "DINOSYS_SLURM_CLUSTER": "second"}
    env.pop("SLURM_CONF", None)
    conf = tmp_path / "cluster2" / "slurm.conf"
    try:
        first = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True,
                               text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        assert first.stdout == f"export SLURM_CONF={conf}\n"  # only the line to eval
        pids = {p.name: int(p.read_text()) for p in (tmp_path / "cluster2").rglob("*.pid")}
        assert set(pids) == {"slurmctld.pid", "slurmd.pid", "munged.pid"}
        again = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True,
                               text=True, timeout=30, check=True)
        assert again.stdout == first.stdout and "already running" in again.stderr
        assert {p.name: int(p.read_text()) for p in (tmp_path / "cluster2").rglob("*.pid")} == pids
        status = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True,
                                text=True, timeout=30)
        assert status.returncode == 0 and "node localhost: idle" in status.stdout
        out = subprocess.run(["srun", "--ntasks=2", "--time=1", "printenv", "SLURM_CLUSTER_NAME"],
                             env={**env, "SLURM_CONF": str(conf)}, capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert out.split() == ["second", "second"]
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)
    assert not (tmp_path / "cluster2").exists()
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists(), f"daemon {pid} still running after stop"
    stopped = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True,
                             text=True, timeout=30)
    assert stopped.returncode == 3 and "slurmctld: stopped" in stopped.stdout
    tmp_path.rmdir()
