"""Any registered evaluator as a periodic evaluation of a training run.

:class:`RegistryEvaluator` is a callable ``(task, step) -> {name: float}`` with ``name``,
``every_n_steps`` and ``last`` (the full result of the latest call): what the training loop calls
every so many steps, on every rank (the evaluator shards its feature extraction over the ranks).
It evaluates the task's ``periodic_eval_modules()`` (by default its main export over the world;
a distillation student on its own rank subgroup, over that subgroup only) in eval mode and
restores each module's mode afterwards. The evaluation folders are decoded once, at the first
call, and kept (:mod:`dinosys.eval.feature_cache`); features are extracted afresh at every
call and dropped after it. The training configs' ``eval.*`` keys become these evaluators in
:func:`dinosys.train.periodic_eval.build_periodic_evaluators`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dinosys.eval.feature_cache import FeatureCache, shared_features
from dinosys.eval.features import sharded_over
from dinosys.eval.models import EvalModel, model_image_size
from dinosys.eval.registry import get_evaluator


class RegistryEvaluator:
    """Run evaluator ``evaluator`` with ``config`` on the current weights every
    ``every_n_steps`` steps; logs its ``metrics`` as ``<name>/<metric>``."""

    def __init__(self, evaluator: str, config: Any, every_n_steps: int,
                 mean: tuple[float, ...], std: tuple[float, ...],
                 name: str | None = None, image_size: int | None = None) -> None:
        self.evaluator = get_evaluator(evaluator)
        self.config = config
        self.every_n_steps = every_n_steps
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size = image_size  # None: the model's own (model_image_size)
        self.name = name or evaluator
        self.last: dict[str, Any] | None = None
        self.cache = FeatureCache()  # decoded folders, kept between calls

    def evaluate(self, module: nn.Module, device: torch.device | str) -> dict[str, float]:
        """The evaluator on ``module`` (its mode is restored); returns the logged scalars."""
        model = EvalModel(module, self.name, self.image_size or model_image_size(module),
                          self.mean, self.std, torch.device(device))
        with shared_features(self.cache):
            try:
                self.last = self.evaluator.run(model, self.config)
            finally:
                self.cache.forget_features()  # the weights change before the next call
        return {f"{self.name}/{k}": float(v) for k, v in self.last.get("metrics", {}).items()}

    def __call__(self, task: Any, step: int) -> dict[str, float]:
        """Evaluate ``task``'s periodic-evaluation modules at ``step``
        (:meth:`~dinosys.train.tasks.base.TrainTask.periodic_eval_modules`: by default its main
        export over the world). A module on a rank subgroup is evaluated by that group alone
        and logged as ``<prefix><name>/<metric>``; every rank returns every prefix's scalars."""
        targets = task.periodic_eval_modules()
        if list(targets) == [""] and targets[""][1] is None:
            return self.evaluate(targets[""][0], task.device)
        out: dict[str, float] = {}
        for prefix, (module, group) in targets.items():
            with sharded_over(group):
                out.update({prefix + k: v for k, v in self.evaluate(module, task.device).items()})
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, out)  # rank 0 logs the students of other groups too
            for part in parts:
                out.update(part)
        self.last = {"metrics": dict(out)}
        return out
