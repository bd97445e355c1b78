"""Evaluations the loop runs every so many steps (a collapse watch during training).

The loop only knows :class:`PeriodicEvaluator`: a callable ``(task, step) -> metrics`` with a
``name`` and an ``every_n_steps``. ``build_periodic_evaluators`` makes the ones a run config asks
for, each a registered evaluator (:class:`dinosys.eval.periodic.RegistryEvaluator`: the same
code as ``dinosys eval NAME``) on the task's main export: ``eval.knn_*`` the weighted kNN
(logged as ``knn/top1_k<k>``), ``eval.zeroshot_*`` the zero-shot classification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dinosys.config import ConfigError, Section, check_bounds
from dinosys.errors import UserError

if TYPE_CHECKING:
    from dinosys.train.tasks.base import RunConfig, TrainTask


@dataclass
class PeriodicEvalConfig(Section):
    """Evaluations during training (kNN: a collapse watch; zero-shot for image-text models)."""

    knn_every_n_steps: int = 0  # 0: off
    knn_train: str | None = None  # kNN reference folder DIR/<class>/<image> (periodic kNN)
    knn_val: str | None = None  # kNN query folder DIR/<class>/<image> (periodic kNN)
    # neighbour counts of the periodic kNN
    knn_k: list[int] = field(default_factory=lambda: [10, 20])
    knn_temperature: float = 0.07  # vote temperature of the periodic kNN
    zeroshot_every_n_steps: int = 0  # 0: off; zero-shot of an image-text model (eval zeroshot)
    zeroshot_val: str | None = None  # zero-shot folder DIR/<class>/<image>
    zeroshot_templates: str | None = None  # prompt templates file (None: the 7 simple ones)

    def validate(self) -> None:
        check_bounds(self, "eval", {"knn_k": (1, None), "knn_temperature": (1e-8, None)})
        if self.knn_every_n_steps < 0:
            raise ConfigError("config key 'eval.knn_every_n_steps': must be >= 0 (0: off)")
        if self.zeroshot_every_n_steps < 0:
            raise ConfigError("config key 'eval.zeroshot_every_n_steps': must be >= 0 (0: off)")


class PeriodicEvaluator(Protocol):
    """What the loop calls every ``every_n_steps`` steps, on every rank (collectives allowed)."""

    name: str
    every_n_steps: int
    last: dict[str, Any] | None  # the full result of the latest call (run summary, model card)

    def __call__(self, task: TrainTask, step: int) -> dict[str, float]:
        """Evaluate the task's current model; returns the scalars to log (metrics.jsonl)."""


def build_periodic_evaluators(cfg: RunConfig, task: TrainTask) -> list[PeriodicEvaluator]:
    """The evaluators ``cfg.eval`` turns on: registry evaluators
    (:class:`dinosys.eval.periodic.RegistryEvaluator`) on ``task``'s main export."""
    from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD

    main = next(iter(task.exports().values()))
    return periodic_evaluators(cfg.eval, main.card.get("mean", IMAGENET_MEAN),
                               main.card.get("std", IMAGENET_STD))


def periodic_evaluators(ev: PeriodicEvalConfig, mean: Sequence[float], std: Sequence[float],
                        image_size: int | None = None) -> list[PeriodicEvaluator]:
    """``eval.knn_*`` -> the registry's ``knn``, ``eval.zeroshot_*`` -> ``zeroshot``, each
    every so many steps, with the model's normalisation (and ``image_size``; None: the
    model's own)."""
    from dinosys.eval.periodic import RegistryEvaluator
    from dinosys.eval.registry import get_evaluator

    evaluators: list[PeriodicEvaluator] = []
    if ev.knn_every_n_steps:
        if not (ev.knn_train and ev.knn_val):
            raise UserError("eval.knn_every_n_steps > 0 needs eval.knn_train and eval.knn_val "
                            "(image folders DIR/<class>/<image>)")
        knn = get_evaluator("knn").make_config(train=ev.knn_train, val=ev.knn_val,
                                               k=list(ev.knn_k), temperature=ev.knn_temperature)
        evaluators.append(RegistryEvaluator("knn", knn, ev.knn_every_n_steps, tuple(mean),
                                            tuple(std), image_size=image_size))
    if ev.zeroshot_every_n_steps:
        if not ev.zeroshot_val:
            raise UserError("eval.zeroshot_every_n_steps > 0 needs eval.zeroshot_val (an image "
                            "folder DIR/<class>/<image>)")
        zs = get_evaluator("zeroshot").make_config(val=ev.zeroshot_val,
                                                   templates=ev.zeroshot_templates)
        evaluators.append(RegistryEvaluator("zeroshot", zs, ev.zeroshot_every_n_steps,
                                            tuple(mean), tuple(std), image_size=image_size))
    return evaluators
