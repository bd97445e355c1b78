"""Checks of every enabled stage's configuration before any stage runs: a bad key in a stage's
recipe or overrides is found at submission (``launch/submit.py pipeline``), not when that
stage's job starts hours later.

Each stage's config is loaded the way the stage loads it (the recipe, the stage's overrides with
``{out}`` and ``{builtin}`` substituted) but without what its inputs wire in at run time (the
curated shards, the teacher), and without requiring paths that earlier stages create. The
curation's config is checked by the launcher (``launch/pipeline.py``): dinosys does not import
curation, and locally the curate stage is the first to run anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dinosys.errors import UserError
from dinosys.factory.config import PipelineConfig
from dinosys.factory.stages import Context, is_enabled, load_stages

# the `dinosys` command whose schema each training stage's recipe follows
TRAIN_COMMANDS = {"pretrain": "train", "distill": "distill", "text_align": "clip"}


def _train_config(name: str) -> Callable[[Context], object]:
    def check(ctx: Context) -> object:
        from dinosys.cli import load_command_config

        return load_command_config(TRAIN_COMMANDS[name], getattr(ctx.cfg, name).recipe,
                                   ctx.overrides(name))
    return check


def _evaluate_config(ctx: Context) -> object:
    from dinosys.eval.suite import load_suite

    cfg = ctx.cfg.evaluate
    return {suite: load_suite(suite, Path(ctx.builtin), check_paths=False)
            for suite in (cfg.suite, cfg.text_suite) if suite}


def _export_config(ctx: Context) -> object:
    from dinosys.export.registry import EXPORTERS

    known = ["native", *EXPORTERS]
    cfg = ctx.cfg.export
    for key, formats in (("formats", cfg.formats), ("text_formats", cfg.text_formats)):
        unknown = [f for f in formats if f not in known]
        if unknown:
            raise UserError(f"export.{key}: unknown export format(s) {unknown}; choose from "
                            f"{known}")
    return {"formats": list(cfg.formats), "text_formats": list(cfg.text_formats)}


CHECKS: dict[str, Callable[[Context], object]] = {
    **{name: _train_config(name) for name in TRAIN_COMMANDS},
    "evaluate": _evaluate_config,
    "export": _export_config,
}


def check_stages(cfg: PipelineConfig, out: Path) -> dict[str, object]:
    """Every enabled stage's loaded config (of the stages in ``CHECKS``); UserError naming the
    stage for the first that does not load."""
    loaded: dict[str, object] = {}
    for name in load_stages():
        if not is_enabled(cfg, name) or name not in CHECKS:
            continue
        try:
            loaded[name] = CHECKS[name](Context(cfg, Path(out)))
        except UserError as exc:
            raise UserError(f"stage {name}: {exc}") from None
    return loaded
