"""The task contract: what every training job (SSL, CLIP, distillation, ...) gives the loop.

The loop (:mod:`dinosys.train.loop`) owns the optimizer, the lr / weight-decay schedule,
gradient clipping, non-finite step skipping, logging, checkpoints, preemption and the periodic
evaluators. Everything else belongs to a :class:`TrainTask`: its config schema (a
:class:`RunConfig` subclass), its modules and how they are sharded, its loader, its parameter
groups, its own scheduled values, batch preparation on the device, hooks around the optimizer
step, batch size and FLOPs, checkpoint state and exports. See docs/tasks.md for a worked
example (:mod:`dinosys.train.tasks.toy`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from dinosys.config import ConfigError, Section, check_bounds
from dinosys.data.stream import DataConfig
from dinosys.distributed.env import DistEnv
from dinosys.distributed.fsdp import DistConfig, build_mesh, shard_modules
from dinosys.train.metrics import LogConfig
from dinosys.train.optim import OptimConfig, build_param_groups
from dinosys.train.periodic_eval import PeriodicEvalConfig
from dinosys.train.train_state import CheckpointConfig


@dataclass
class RunConfig(Section):
    """What every training run has, whatever its task; a task's schema extends it with its own
    sections (``model``, ``loss``, ``crops`` ...). ``task`` names the entry of ``TASKS``."""

    name: str = "run"  # run name: the default run directory runs/<name>-<time> and the job name
    task: str = "ssl"  # a name in dinosys.train.tasks.TASKS (or "module:Class" of a task)
    seed: int = 0  # RNG seed (rank r seeds with seed + r)
    max_steps: int | None = None  # None: optim.epochs * optim.iters_per_epoch
    # stop after this many NaN/inf steps in a row (each is skipped)
    max_consecutive_nonfinite: int = 5
    # testing aid: the first try of each listed step gets a NaN loss (list a step k times to
    # poison k tries in a row); exercises the skip-and-count path end to end
    debug_nonfinite_steps: list[int] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)

    def validate(self) -> None:
        check_bounds(self, "", {"seed": (0, 2**63 - 1), "max_steps": (1, None),
                                "debug_nonfinite_steps": (0, None)})
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError("config key 'max_consecutive_nonfinite': must be >= 1")

    def total_steps(self) -> int:
        """``max_steps`` if set, else ``optim.epochs * optim.iters_per_epoch``."""
        return int(self.max_steps if self.max_steps is not None
                   else self.optim.epochs * self.optim.iters_per_epoch)


@dataclass
class Exportable:
    """One model a task exports at the end of a run (``RUN/export/<name>/``).

    ``module`` is the live, possibly sharded module (its full weights are gathered from every
    rank); ``build`` makes a fresh unsharded module of the same architecture on the CPU (rank 0
    loads the gathered weights into it; its ``model_type`` attribute picks the export code);
    ``card`` holds model-card fields (``mean``/``std``, ``objective``, ...).

    ``rank`` is the global rank that writes it: the module may live on a subgroup of ranks
    (a distillation student on its own ranks), gathered over its own mesh only, and then only
    those ranks list it in :meth:`TrainTask.exports`. ``formats`` are the export formats
    (``dinosys.export.EXPORTERS``; native is always written). ``evaluate``, when set, is called
    on the writer's gathered copy (eval mode, on the CPU) before writing; its scalars go into
    the model card (``evaluation``) and the run summary.
    """

    module: nn.Module
    build: Callable[[], nn.Module]
    card: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    formats: list[str] = field(default_factory=lambda: ["native"])
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None


class TrainTask(ABC):
    """One kind of training job. Subclass, set the class attributes, implement the abstract
    methods and decorate with :func:`dinosys.train.tasks.register_task`.

    Class attributes: ``name`` (the ``TASKS`` key and the config's ``task`` value),
    ``config_class`` (the schema, a :class:`RunConfig` subclass), ``command`` (the ``dinosys``
    subcommand, and ``launch/submit.py`` job kind, that runs this task by default, e.g.
    ``"clip"``; None: only reachable with ``task=NAME``), ``config_kind`` (the ``configs/``
    subfolder searched first for a CONFIG name), ``checkpoint_backbone`` (the checkpoint key of
    the backbone that loading a checkpoint directly gives, e.g. ``"teacher.backbone"``).

    Order of calls: ``__init__(cfg, env)`` builds the modules on the CPU (the RNG is seeded
    already), :meth:`shard`, :meth:`build_loader`, :meth:`param_groups`; then per step
    :meth:`prepare_batch`, :meth:`forward_loss` (per micro-batch, then backward),
    :meth:`before_optimizer_step`, clipping, ``optimizer.step()``,
    :meth:`after_optimizer_step`; :meth:`exports` at the end.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[RunConfig]] = RunConfig
    command: ClassVar[str | None] = None
    config_kind: ClassVar[str] = "train"
    #: checkpoint key of the backbone ``dinosys.export.load(CHECKPOINT)`` reads (None: none)
    checkpoint_backbone: ClassVar[str | None] = None

    def __init__(self, cfg: RunConfig, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.device = env.device

    @classmethod
    def check_inputs(cls, cfg: RunConfig) -> None:
        """Check what the schema cannot see (files the task reads, e.g. a distillation
        teacher) before any data is built, anything is written or a model is built; raise a
        one-line UserError. Called first by the run path, on every rank (default: nothing)."""
        del cfg

    @classmethod
    def device_layout(cls, cfg: RunConfig, env: DistEnv) -> RunConfig:
        """The config to train with on ``env`` (called before ``__init__``): a task that can
        estimate its memory may turn FSDP2 / activation checkpointing off where they only cost
        time (default: ``cfg`` as it is)."""
        del env
        return cfg

    # ---------------------------------------------------------------- modules

    @abstractmethod
    def trainable_modules(self) -> Mapping[str, nn.Module]:
        """Modules the optimizer trains, by name; gradients are clipped per module."""

    def shard(self) -> None:
        """Move the modules to the device and apply activation checkpointing, compile and FSDP2
        (default: every trainable module; override for frozen or EMA copies, which must be
        sharded like the module they follow)."""
        mesh = build_mesh(self.env, self.cfg.dist)
        shard_modules(self.trainable_modules(), self.env, self.cfg.dist, mesh)

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Every module whose weights a checkpoint holds, by name (no dots in names)."""
        return dict(self.trainable_modules())

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Non-parameter state to checkpoint (e.g. a teacher centre), as tensors; it is also
        restored when a step is skipped for a non-finite loss."""
        return {}

    def load_extra_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_state` returned (nothing to restore by default)."""
        del state

    # ---------------------------------------------------------------- data

    @abstractmethod
    def build_loader(self) -> Iterable[Any]:
        """This rank's infinite batch iterable; ``state_dict()`` / ``load_state_dict()`` (if it
        has them) make the data position part of the checkpoint. Usually a
        :class:`dinosys.data.stream.SampleStream` with the task's batch transform."""

    def prepare_batch(self, batch: Any) -> Any:
        """The batch on the training device, ready for :meth:`forward_loss` (default: every
        tensor of a dict moved to the device)."""
        if isinstance(batch, Mapping):
            return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()}
        return batch

    def batch_size(self, batch: Any) -> int:
        """Samples (images) in ``batch`` on this rank, for throughput figures."""
        return int(batch["batch_size"])

    def step_flops(self, batch: Any) -> float:
        """Model FLOPs of one training step on ``batch`` on this rank (0: unknown)."""
        del batch
        return 0.0

    # ---------------------------------------------------------------- optimisation

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups (``lr_mult``, ``wd_mult`` per group). Default: layer-wise lr
        decay over the layers each module declares (``num_layers`` / ``layer_id(name)``),
        no weight decay on biases, norms and tokens."""
        return build_param_groups(self.trainable_modules(), self.cfg.optim)

    def schedule_values(self, step: int) -> dict[str, float]:
        """The task's own scheduled values at ``step`` (logged with the losses)."""
        del step
        return {}

    @abstractmethod
    def forward_loss(self, batch: Any, step: int) -> dict[str, Any]:
        """One forward pass of a prepared micro-batch at optimisation step ``step``. Returns
        ``{"loss": scalar tensor to backpropagate, ...}``; other entries are scalar tensors or
        floats to log."""

    def before_optimizer_step(self, step: int) -> None:
        """After backward, before clipping and ``optimizer.step()`` (e.g. drop the gradients of
        a frozen last layer)."""
        del step

    def after_optimizer_step(self, step: int, applied: torch.Tensor) -> None:
        """After ``optimizer.step()`` (e.g. the EMA teacher update, a logit-scale clamp).
        ``applied`` is a 0-d device tensor, 1 when the step was applied and 0 when it was
        skipped for a non-finite loss or gradient: use it as a mask (``torch.where``, a weight)
        so nothing changes on a skipped step and the host never waits for the device."""
        del step, applied

    # ---------------------------------------------------------------- outputs

    def rank_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """This rank's logged scalars as the loop averages them over the world (one
        all-reduce, so every rank must give the same keys). Default: as they are; a task whose
        ranks train different models (students on rank subgroups) gives every key on every rank,
        weighted so that the world mean is the value to log."""
        return logs

    def run_summary(self, summary: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
        """Task-specific fields to add to the run summary: ``summary`` is the generic one
        (``status``, ``exports``, ``evaluations`` ...), ``last`` the last logged record."""
        del summary, last
        return {}

    def periodic_eval_modules(self) -> dict[str, tuple[nn.Module, Any]]:
        """What the periodic evaluators evaluate on this rank: log-key prefix -> (module, the
        process group of the ranks that hold it, None: the whole world). Every rank of a group
        evaluates its module together (feature extraction sharded over that group only). Default:
        the main export, unprefixed, over the world."""
        return {"": (next(iter(self.exports().values())).module, None)}

    @abstractmethod
    def exports(self) -> dict[str, Exportable]:
        """The models written to ``RUN/export/<name>/`` at the end of the run, by name; the
        first is the run's main model (periodic evaluators and ``dinosys.export.load(RUN)``
        use it)."""
