"""The training step never waits on the device: no tensor is read on the host inside it.

On CPU, every host read of a tensor (``.item()``, ``.tolist()``, ``bool()``, ``float()``,
``int()``, ``.cpu()``, ``.numpy()``) is counted through patched Tensor methods; on a GPU,
torch's sync debug mode turns any synchronising call into an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dinosys.config import load_config
from dinosys.data.collate import collate_ssl
from dinosys.data.masking import MaskGenerator
from dinosys.distributed.env import DistEnv
from dinosys.train.device_step import read_scalars
from dinosys.train.loop import Trainer
from dinosys.train.tasks.ssl import SSLConfig, SSLTask
from tests.train.conftest import TINY

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[str]]:
    """Record the name of every host read of a tensor inside the block."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name: str, fn):  # type: ignore[no-untyped-def]
        def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(name)
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def make_batch(cfg: SSLConfig, patch: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    size, local, c = cfg.crops.global_size, cfg.crops.local_size, cfg.model.in_chans
    samples = [{"global_crops": [torch.randn(c, size, size, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(c, local, local, generator=gen)
                                for _ in range(cfg.crops.n_local)],
                "label": -1} for _ in range(cfg.data.batch_size_per_gpu)]
    batch = collate_ssl(samples, MaskGenerator(size // patch, cfg.masking),
                        np.random.default_rng(0))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_trainer(tmp_path: Path, device: torch.device, *extra: str) -> tuple[Trainer, dict]:
    cfg = load_config(SSLConfig, "mnist_tiny_cpu",
                      [*TINY, "model.drop_path_rate=0.4", "optim.freeze_last_layer_epochs=0",
                       "checkpoint.every_n_steps=0", *extra], kind="train")
    torch.manual_seed(0)
    env = DistEnv(device=device)
    task = SSLTask(cfg, env)
    for module in (*task.student.values(), *task.teacher.values()):
        module.to(device)
    trainer = Trainer(task, None, cfg, env, tmp_path, total_steps=10, total_batch=8)
    return trainer, make_batch(cfg, task.patch_size, device)


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"s.{k}": v.detach().clone() for k, v in trainer.task.student.state_dict().items()}
    out.update({f"t.{k}": v.detach().clone()
                for k, v in trainer.task.teacher.state_dict().items()})
    out.update({f"x.{k}": v.clone() for k, v in trainer.task.extra_state().items()})
    for i, s in enumerate(trainer.optimizer.state.values()):
        out.update({f"o{i}.{k}": v.clone() for k, v in s.items()})
    return out


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_train_step_reads_nothing_on_the_host(tmp_path: Path, centering: str) -> None:
    trainer, batch = make_trainer(tmp_path, torch.device("cpu"), f"loss.centering={centering}",
                                  "debug_nonfinite_steps=[3]")
    assert all(g["fused"] for g in trainer.optimizer.param_groups)
    trainer.train_step([batch], 1)  # first step: optimizer state, caches
    with count_host_reads() as calls:
        applied, logs = trainer.train_step([batch], 2)
    assert calls == []
    assert bool(applied)
    values = read_scalars(logs)
    assert np.isfinite(values["loss"]) and values["grad_norm/backbone"] > 0
    # a non-finite step is skipped on the device: nothing moves, still no host read
    before = state(trainer)
    with count_host_reads() as calls:
        applied, _ = trainer.train_step([batch], 3)
    assert calls == []
    assert not bool(applied)
    after = state(trainer)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    applied, _ = trainer.train_step([batch], 4)
    assert bool(applied)
    assert not torch.equal(state(trainer)["s.backbone.cls_token"], after["s.backbone.cls_token"])


@pytest.mark.gpu
def test_train_step_has_no_cuda_sync(tmp_path: Path) -> None:
    trainer, batch = make_trainer(tmp_path, torch.device("cuda"), "dist.param_dtype=bf16")
    trainer.train_step([batch], 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        applied, logs = trainer.train_step([batch], 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(applied) and np.isfinite(read_scalars(logs)["loss"])
