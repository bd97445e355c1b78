"""The evaluator registry: every evaluation (kNN, linear, zero-shot, retrieval, ...) is one entry,
and the CLI (``dinosys eval NAME``), the suite (``dinosys eval suite``), the training loop's
periodic evaluation and the Slurm launcher (``launch/submit.py eval``) all run evaluators
through it, so each protocol exists once.

The evaluator contract
----------------------
An evaluator is a module in ``dinosys/eval/`` that defines

* a **config dataclass**: one field per option, every field with a default except the data
  paths. Field metadata drives the command line: ``help`` (the option's help text), ``flag``
  (the option name when it is not ``--field-name``), ``path`` (True: the value is a file or
  folder that must exist; checked before anything runs, also on the submitting machine).
  ``file_example`` (a file content the evaluator accepts, for generic tests of a ``path``
  field that must be a file).
  ``list[int]``/``list[float]``/``list[str]`` fields take several values, ``bool`` fields are
  ``--x/--no-x``. A ``validate(self)`` method may raise :class:`dinosys.errors.UserError` for
  values no type can express (a negative k, an empty grid).
* ``run(model: EvalModel, cfg) -> dict``: evaluates the model and returns a JSON-serialisable
  result. ``result["metrics"]`` is a flat ``{name: float}`` of the headline numbers (what the
  suite's table and the model card show, what the training loop logs); anything else (the whole
  grid of a linear probe, per-k accuracies, timings) goes beside it. ``run`` is called on
  *every* rank of a distributed job with the same arguments; it shards feature extraction with
  :func:`dinosys.eval.features.extract_features` (which gathers the features onto every rank)
  and returns the same result on every rank. Bad input (mismatched class folders, a single
  class, a model without the features the evaluator needs) raises ``UserError`` with one line.

and registers both with :func:`register_evaluator`::

    @dataclass
    class MyConfig:
        val: str = field(metadata={"help": "image folder DIR/<class>/<image>", "path": True})
        batch_size: int = 256

    @register_evaluator("mine", MyConfig, help="what it measures", needs=("cls",))
    def run(model: EvalModel, cfg: MyConfig) -> dict:
        feats = extract_features(model, load_eval_images(model, cfg.val), ("cls",))
        ...
        return {"metrics": {"top1": acc}, ...}

``needs`` names the feature kinds of :data:`dinosys.eval.features.FEATURES` the evaluator
uses (or other capabilities its run checks itself, e.g. a text tower); it is shown in
``dinosys eval --help``. ``features=fn`` (optional), ``fn(module, cfg) ->
[dinosys.eval.feature_cache.FeatureNeed]``, says which folders and feature kinds ``run`` will
extract: ``dinosys eval suite`` then extracts each folder once for all its evaluations and
``run``'s own :func:`~dinosys.eval.features.extract_features` calls are served from that.
New feature kinds (a different pooling, an ``encode_image`` of another model family) are
registered in ``dinosys.eval.features`` the same way.

Add the module's name to :data:`EVALUATOR_MODULES` so the registry imports it. Nothing else is
needed: the command line, the suite, the launcher and periodic evaluation pick it up.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dinosys.errors import UserError

# modules whose import registers evaluators (imported on first use of the registry)
EVALUATOR_MODULES = ("dinosys.eval.knn", "dinosys.eval.linear", "dinosys.eval.zeroshot",
                     "dinosys.eval.retrieval", "dinosys.eval.suite")


@dataclass(frozen=True)
class Evaluator:
    """One registered evaluation protocol."""

    name: str
    config: type  # the config dataclass
    run: Callable[[Any, Any], dict]  # run(model: EvalModel, cfg) -> dict
    help: str = ""
    needs: tuple[str, ...] = ()  # feature kinds / capabilities, for help texts
    # features(module, cfg) -> [FeatureNeed]: what run() will extract, so that a suite
    # extracts each folder once for all its evaluations (None: nothing to share)
    features: Callable[[Any, Any], list] | None = None

    def make_config(self, **values: Any) -> Any:
        """A validated config from keyword values (unknown keys: UserError naming them)."""
        known = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"evaluator '{self.name}' has no option(s) {unknown}; it has "
                            f"{sorted(known)}")
        try:
            cfg = self.config(**values)
        except TypeError as exc:  # a required field is missing
            missing = [f.name for f in dataclasses.fields(self.config)
                       if f.name not in values and f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING]
            raise UserError(f"evaluator '{self.name}' needs {missing or exc}") from exc
        validate_config(cfg)
        return cfg


EVALUATORS: dict[str, Evaluator] = {}
_loaded = False


def register_evaluator(name: str, config: type, help: str = "",  # noqa: A002
                       needs: tuple[str, ...] = (),
                       features: Callable[[Any, Any], list] | None = None
                       ) -> Callable[[Callable], Callable]:
    """Decorator: register ``run(model, cfg) -> dict`` under ``name`` with its config class
    (``features``: see :class:`Evaluator`)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"evaluator {name}: config must be a dataclass, got {config!r}")

    def decorate(run: Callable[[Any, Any], dict]) -> Callable[[Any, Any], dict]:
        if name in EVALUATORS and EVALUATORS[name].run is not run:
            raise ValueError(f"evaluator '{name}' is already registered")
        EVALUATORS[name] = Evaluator(name, config, run, help, tuple(needs), features)
        return run

    return decorate


def evaluators() -> dict[str, Evaluator]:
    """Every registered evaluator (importing the built-in evaluator modules once)."""
    global _loaded
    if not _loaded:
        for module in EVALUATOR_MODULES:
            importlib.import_module(module)
        _loaded = True
    return EVALUATORS


def get_evaluator(name: str) -> Evaluator:
    """The evaluator called ``name``; UserError listing the known ones otherwise."""
    known = evaluators()
    if name not in known:
        raise UserError(f"unknown evaluator '{name}'; one of {', '.join(sorted(known))}")
    return known[name]


def validate_config(cfg: Any) -> None:
    """Run the config's own ``validate()`` and check that its ``path`` fields exist."""
    from pathlib import Path

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("path") and value is not None and not Path(str(value)).exists():
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            raise UserError(f"{flag} {value}: not found (no such file or directory)")
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def run_evaluator(name: str, model: Any, cfg: Any | None = None, **values: Any) -> dict:
    """Run evaluator ``name`` on ``model`` (an :class:`~dinosys.eval.models.EvalModel`, a module
    or a model spec) with ``cfg`` or a config built from ``values``; the result carries
    ``evaluator`` and the config."""
    from dinosys.eval.models import as_eval_model

    evaluator = get_evaluator(name)
    if cfg is None:
        cfg = evaluator.make_config(**values)
    elif values:
        raise TypeError("pass either cfg or keyword values, not both")
    else:
        validate_config(cfg)
    result = dict(evaluator.run(as_eval_model(model), cfg))
    result.setdefault("evaluator", name)
    result.setdefault("config", dataclasses.asdict(cfg))
    return result
