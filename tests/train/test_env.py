"""Launcher detection (torchrun, Slurm/submitit, single process) and per-rank RNG seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dinosys.distributed.env import (
    detect_layout,
    first_slurm_host,
    init_distributed,
    seed_everything,
)

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_NODELIST", "SLURM_JOB_NODELIST", "SUBMITIT_EXECUTOR",
               "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)


def test_single_process() -> None:
    assert detect_layout() == ("single", 0, 1, 0)
    env = init_distributed()
    assert (env.rank, env.world_size, env.is_distributed, env.is_main) == (0, 1, False, True)
    env.shutdown()


def test_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")  # torchrun/submitit export wins over raw Slurm
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert detect_layout() == ("torchrun", 3, 8, 1)


@pytest.mark.parametrize(("executor", "elastic", "launcher"), [
    ("slurm", False, "slurm"), ("local", False, "submitit-local"), (None, True, "torchrun"),
    ("slurm", True, "torchrun"),  # torchrun started inside a Slurm job: torchrun set RANK
])
def test_who_set_the_rank_variables_is_the_launcher(monkeypatch: pytest.MonkeyPatch,
                                                    executor, elastic, launcher) -> None:
    """A submitit task on Slurm exports RANK/WORLD_SIZE like torchrun; it is logged as slurm."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    if executor:
        monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
    if elastic:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert detect_layout() == (launcher, 1, 2, 1)


def test_slurm_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert detect_layout() == ("slurm", 5, 8, 1)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # an allocation with one task: single process
    assert detect_layout() == ("single", 0, 1, 0)


@pytest.mark.parametrize(("nodelist", "host"), [
    ("node7", "node7"), ("gpu[001-004,007]", "gpu001"), ("gpu[12,15],cpu1", "gpu12"),
    ("a-[3-4]-x,b1", "a-3-x"),
])
def test_first_slurm_host(nodelist: str, host: str) -> None:
    assert first_slurm_host(nodelist) == host


def test_seeds_differ_per_rank_and_repeat() -> None:
    def draw(rank: int) -> tuple:
        seed_everything(7, rank)
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    assert draw(0) == draw(0)
    assert all(a != b for a, b in zip(draw(0), draw(1)))
