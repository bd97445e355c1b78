"""Where this process runs: torchrun, Slurm (incl. submitit) or a single process.

``init_distributed()`` reads the environment, sets the device, initialises the default process
group (nccl on GPU, gloo on CPU) when there is more than one rank, and returns a :class:`DistEnv`.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import re
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dinosys.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass
class DistEnv:
    """Rank layout and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group
    launcher: str = "single"  # single, torchrun, slurm, submitit-local

    @property
    def is_distributed(self) -> bool:
        """True when a process group spans more than one rank."""
        return self.backend is not None and self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the one that logs and writes summaries)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op single-process)."""
        if self.is_distributed:
            dist.barrier()

    def shutdown(self) -> None:
        """Destroy the process groups if this module created them (:func:`close_process_groups`)."""
        if self.is_distributed:
            close_process_groups()
        self.backend = None


def close_process_groups() -> None:
    """Barrier, then destroy every process group: no rank tears down while another still runs a
    collective or prints (a gloo peer that exits early aborts the others: "terminate called
    without an active exception")."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    finally:
        # modules and meshes left in reference cycles (FSDP's hooks) would otherwise outlive
        # destroy_process_group and die in interpreter finalisation, after the peers exited
        gc.collect()
        dist.destroy_process_group()


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a Slurm node list such as ``gpu[001-004,007],cpu1``."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.match(r"^(.*?)\[([^\]]+)\](.*)$", first)
    if not match:
        return first
    prefix, ranges, suffix = match.groups()
    start = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{start}{suffix}"


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as exc:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from exc


def _rank_variables_launcher() -> str:
    """Who set RANK/WORLD_SIZE: torchrun (its agent sets TORCHELASTIC_RUN_ID), a submitit task
    on Slurm (``slurm``) or on this machine (``submitit-local``); anything else is taken as
    torchrun-style variables (``torchrun``)."""
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    if "TORCHELASTIC_RUN_ID" not in os.environ and executor in ("slurm", "local"):
        return "slurm" if executor == "slurm" else "submitit-local"
    return "torchrun"


def detect_layout() -> tuple[str, int, int, int]:
    """``(launcher, rank, world_size, local_rank)`` from torchrun or Slurm variables.

    torchrun (and submitit's ``TorchDistributedEnvironment().export()``, reported as ``slurm``
    or ``submitit-local``) set RANK/WORLD_SIZE;
    a plain ``srun`` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. A Slurm allocation with one
    task (e.g. an interactive ``salloc`` shell) is a single process.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
        local = _int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        return _rank_variables_launcher(), rank, world, local
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        rank, world = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS")
        local = _int_env("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0
        return "slurm", rank, world, local
    return "single", 0, 1, 0


def _prepare_slurm_rendezvous() -> None:
    """MASTER_ADDR/PORT for a plain ``srun`` launch: first node of the list, a job-derived port."""
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        os.environ["MASTER_ADDR"] = first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
        os.environ["MASTER_PORT"] = str(DEFAULT_PORT + job % 20000)


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Detect the launcher, pick the device and initialise the process group if needed."""
    launcher, rank, world, local = detect_layout()
    if torch.cuda.is_available():
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    env = DistEnv(rank=rank, world_size=world, local_rank=local, device=device, backend=None,
                  launcher=launcher)
    if world == 1:
        return env
    if launcher == "slurm":
        _prepare_slurm_rendezvous()
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(f"{launcher} launch with {world} ranks but {var} is not set")
    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    env.backend = backend
    log.info("rank %d/%d (local %d) on %s via %s, host %s", rank, world, local, device,
             launcher, socket.gethostname())
    return env


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch differently on each rank (``seed + rank``)."""
    value = seed + rank
    random.seed(value)
    np.random.seed(value % (2**32))
    torch.manual_seed(value)


def rng_state() -> dict:
    """This rank's python/numpy/torch(/cuda) RNG states, tensors and plain values only."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
