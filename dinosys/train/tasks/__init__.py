"""Training tasks: the ``TASKS`` registry and how a config picks its task.

A task registers itself with :func:`register_task` (its ``name``, schema and default command);
the built-in tasks are imported here so that ``TASKS`` lists them. ``task: module:Class`` in a
config (or ``task=module:Class``) imports a task from anywhere, which registers it.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Sequence
from typing import TypeVar

from dinosys.config import load_config, peek_value
from dinosys.errors import ConfigError
from dinosys.train.tasks.base import Exportable, RunConfig, TrainTask

TASKS: dict[str, type[TrainTask]] = {}
T = TypeVar("T", bound=type[TrainTask])

# modules whose import registers the built-in tasks (a new task adds its module here)
BUILTIN_TASK_MODULES = ("dinosys.train.tasks.ssl", "dinosys.train.tasks.toy",
                        "dinosys.train.tasks.clip", "dinosys.distill.task")


def register_task(cls: T) -> T:
    """Class decorator: add a :class:`TrainTask` subclass to ``TASKS`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is taken by {TASKS[cls.name].__name__}")
    if cls.command is not None:
        for other in TASKS.values():
            if other.command == cls.command and other is not cls:
                raise ValueError(f"command {cls.command!r} already runs task {other.name!r}")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[TrainTask]:
    """The task class registered as ``name`` (or ``module:Class``); ConfigError if unknown."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"config key 'task': cannot import {name!r}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, TrainTask)):
            raise ConfigError(f"config key 'task': {name!r} is not a TrainTask")
        return register_task(cls)
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"config key 'task': unknown task {name!r} (known: "
                          f"{', '.join(sorted(TASKS))}){hint}")
    return TASKS[name]


def task_for_command(command: str) -> type[TrainTask] | None:
    """The task that ``dinosys COMMAND`` / ``submit.py COMMAND`` runs by default (None: none
    registered yet)."""
    for cls in TASKS.values():
        if cls.command == command:
            return cls
    return None


def commands() -> dict[str, type[TrainTask]]:
    """Every command a task claims -> that task."""
    return {cls.command: cls for cls in TASKS.values() if cls.command}


def load_task_config(config: str | os.PathLike | None, overrides: Sequence[str] = (),
                     default_task: str = "ssl") -> RunConfig:
    """Load ``config`` with the schema of its task: the ``task`` key of the file chain or the
    overrides, else ``default_task``. Raises ConfigError (one line) on any problem."""
    default_cls = get_task(default_task)
    kind = default_cls.config_kind
    name = peek_value("task", config, overrides, kind=kind)
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"config key 'task': expected a task name, got {name!r}")
    cls = get_task(name) if name else default_cls
    overrides = list(overrides) if name else [*overrides, f"task={cls.name}"]
    return load_config(cls.config_class, config, overrides, kind=cls.config_kind)


def build_task(cfg: RunConfig, env) -> TrainTask:  # noqa: ANN001 - DistEnv
    """The task ``cfg.task`` names, built for ``cfg`` on ``env``."""
    return get_task(cfg.task)(cfg, env)


for _module in BUILTIN_TASK_MODULES:
    importlib.import_module(_module)

__all__ = ["TASKS", "Exportable", "RunConfig", "TrainTask", "build_task", "commands",
           "get_task", "load_task_config", "register_task", "task_for_command"]
