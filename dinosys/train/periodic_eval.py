"""Evaluations the loop runs every so many steps (a collapse watch during training).

The loop only knows :class:`PeriodicEvaluator`: a callable ``(task, step) -> metrics`` with a
``name`` and an ``every_n_steps``. ``build_periodic_evaluators`` makes the ones a run config asks
for (today the weighted kNN on image folders, on the task's main export).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dinosys.config import ConfigError, Section, check_bounds
from dinosys.errors import UserError

if TYPE_CHECKING:
    from dinosys.train.tasks.base import RunConfig, TrainTask


@dataclass
class PeriodicEvalConfig(Section):
    """kNN evaluation during training (collapse watch)."""

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


class KnnEvaluator:
    """Weighted kNN top-1 of the task's main exported model (its live, possibly sharded module)
    on two image folders ``DIR/<class>/<image>``."""

    name = "knn"

    def __init__(self, every_n_steps: int, train: Any, val: Any, ks: Sequence[int],
                 temperature: float) -> None:
        self.every_n_steps = every_n_steps
        self.train, self.val, self.ks, self.temperature = train, val, list(ks), temperature
        self.last: dict[str, Any] | None = None

    def __call__(self, task: TrainTask, step: int) -> dict[str, float]:
        """kNN on the current weights; logs ``knn_top1/<k>``."""
        from dinosys.eval.knn import knn_eval_module

        module = next(iter(task.exports().values())).module
        self.last = knn_eval_module(module, self.train, self.val, self.ks, self.temperature,
                                    device=task.device)
        return {f"knn_top1/{k}": v for k, v in self.last["top1"].items()}


def build_periodic_evaluators(cfg: RunConfig, task: TrainTask) -> list[PeriodicEvaluator]:
    """The evaluators ``cfg.eval`` turns on, set up for ``task``'s main export."""
    ev = cfg.eval
    evaluators: list[PeriodicEvaluator] = []
    if ev.knn_every_n_steps:
        if not (ev.knn_train and ev.knn_val):
            raise UserError("eval.knn_every_n_steps > 0 needs eval.knn_train and eval.knn_val "
                            "(image folders DIR/<class>/<image>)")
        from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
        from dinosys.eval.images import load_image_folder
        from dinosys.eval.models import model_image_size

        main = next(iter(task.exports().values()))
        size = model_image_size(main.module)
        mean = main.card.get("mean", IMAGENET_MEAN)
        std = main.card.get("std", IMAGENET_STD)
        train = load_image_folder(Path(ev.knn_train), size, mean, std)
        val = load_image_folder(Path(ev.knn_val), size, mean, std)
        evaluators.append(KnnEvaluator(ev.knn_every_n_steps, train, val, ev.knn_k,
                                       ev.knn_temperature))
    if ev.zeroshot_every_n_steps:
        if not ev.zeroshot_val:
            raise UserError("eval.zeroshot_every_n_steps > 0 needs eval.zeroshot_val (an image "
                            "folder DIR/<class>/<image>)")
        from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
        from dinosys.eval.periodic import RegistryEvaluator
        from dinosys.eval.registry import get_evaluator

        main = next(iter(task.exports().values()))
        zs = get_evaluator("zeroshot").make_config(val=ev.zeroshot_val,
                                                   templates=ev.zeroshot_templates)
        evaluators.append(RegistryEvaluator("zeroshot", zs, ev.zeroshot_every_n_steps,
                                            main.card.get("mean", IMAGENET_MEAN),
                                            main.card.get("std", IMAGENET_STD)))
    return evaluators
