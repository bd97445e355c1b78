"""What a training checkpoint holds and how the loop saves and restores it.

Everything that decides the next step is in the checkpoint: student, teacher (with heads),
optimizer, the task's extra state (teacher centres), the step (schedules are functions of it),
per-rank RNG states and the data loader position. So N steps + resume + N steps equals 2N steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dinosys.config import ConfigError, Section
from dinosys.distributed.env import DistEnv

if TYPE_CHECKING:
    from dinosys.train.tasks.base import TrainTask
from dinosys.distributed.sharded_checkpoint import CheckpointManager, OptimizerState

log = logging.getLogger(__name__)


@dataclass
class CheckpointConfig(Section):
    """Sharded, atomic checkpoints."""

    every_n_steps: int = 1250  # save a sharded checkpoint every N steps (0: only at the end)
    keep_last: int = 3  # checkpoints kept (older ones removed)
    keep_every: int = 0  # also keep every K-th step forever (0: off)
    resume: bool = True  # rerunning into the same run directory resumes from its newest checkpoint

    def validate(self) -> None:
        if self.every_n_steps < 0:
            raise ConfigError("config key 'checkpoint.every_n_steps': must be >= 0 (0: off)")
        if self.keep_last < 1:
            raise ConfigError("config key 'checkpoint.keep_last': must be >= 1")
        if self.keep_every < 0:
            raise ConfigError("config key 'checkpoint.keep_every': must be >= 0 (0: off)")


class _TaskExtraState:
    """Stateful view of the task's non-parameter tensors (loaded back in place)."""

    def __init__(self, task: TrainTask) -> None:
        self.task = task

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.task.extra_state().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.task.load_extra_state(state)


class TrainState:
    """Binds the task, optimizer and loader to a :class:`CheckpointManager`."""

    def __init__(self, task: TrainTask, optimizer: torch.optim.Optimizer, loader: Any,
                 root: Path, cfg: CheckpointConfig, env: DistEnv, seed: int = 0) -> None:
        self.task, self.optimizer, self.loader, self.env = task, optimizer, loader, env
        self.manager = CheckpointManager(root, keep_last=cfg.keep_last, keep_every=cfg.keep_every)
        self.seed = seed
        self.last_saved_step: int | None = None

    def _state(self) -> dict[str, Any]:
        modules = self.task.checkpoint_modules()
        trainable = nn.ModuleDict(dict(self.task.trainable_modules()))
        state: dict[str, Any] = dict(modules)
        state["optim"] = OptimizerState(trainable, self.optimizer)
        if self.task.extra_state():
            state["task"] = _TaskExtraState(self.task)
        return state

    def bad_samples(self) -> dict[str, int]:
        """Bad-sample counts by reason, summed over ranks (collective: call on every rank)."""
        return bad_sample_counts(self.loader, self.env)

    def save(self, step: int) -> Path:
        """Collective save of everything at ``step`` (number of completed steps)."""
        rank_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        extra = {"seed": self.seed, "bad_samples": self.bad_samples()}
        path = self.manager.save(step, self._state(), extra=extra,
                                 rank_state={"loader": rank_state})
        self.last_saved_step = step
        return path

    def restore(self) -> int:
        """Load the latest checkpoint if there is one; return the step to continue from."""
        path = self.manager.latest()
        if path is None:
            return 0
        info = self.manager.load(path, self._state())
        rank_state = info.get("rank_state")
        loader_state = None
        if rank_state is not None:
            loader_state = rank_state.get("loader")
        elif info.get("rank_states"):
            loader_state = self._resplit_loader_state(info["rank_states"])
        if loader_state is not None and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(loader_state)
        step = int(info["step"])
        self.last_saved_step = step
        log.info("restored %s (step %d)", path, step)
        return step

    def _resplit_loader_state(self, states: list[dict | None]) -> dict | None:
        """World size changed: hand the loader every saved rank's position if it can re-split."""
        entries = [s.get("loader") for s in states if s]
        if hasattr(self.loader, "resplit_state"):
            return self.loader.resplit_state(entries)
        log.warning("world size changed since the checkpoint: the data loader restarts its "
                    "order from rank 0's saved position")
        if not entries or entries[0] is None:
            return None
        # every saved rank's bad-sample counts go to rank 0, so the sum over ranks continues
        merged: dict[str, int] = {}
        for entry in entries if self.env.rank == 0 else []:
            for reason, n in ((entry or {}).get("bad") or {}).items():
                merged[reason] = merged.get(reason, 0) + int(n)
        return {**entries[0], "bad": merged}


def bad_sample_counts(loader: Any, env: DistEnv) -> dict[str, int]:
    """The loader's bad-sample counts by reason summed over ranks (collective when distributed;
    a loader without ``stats()`` counts nothing)."""
    local = dict(loader.stats()["bad"]) if hasattr(loader, "stats") else {}
    if env.world_size > 1 and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, local)
    else:
        gathered = [local]
    total: dict[str, int] = {}
    for counts in gathered:
        for reason, n in (counts or {}).items():
            total[reason] = total.get(reason, 0) + int(n)
    return dict(sorted(total.items()))
