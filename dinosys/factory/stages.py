"""The stage registry of the factory: each stage names its inputs, how to run it, and whether
every rank of a multi-process job runs it (training) or one process does.

Stages, in order (:func:`load_stages`: each after its inputs): ``pool`` (the demo's raw pool) ->
``curate`` -> ``pretrain`` -> ``distill`` and ``text_align`` -> ``evaluate`` -> ``export``.
Each calls the existing entry point (``dinosys-curate run``, ``run_train``, ``run_distill``,
the eval suite, ``export_model``) with the outputs of its inputs wired in as overrides.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinosys.config import find_config, to_dict
from dinosys.errors import UserError
from dinosys.factory.config import PipelineConfig, Resources, StageConfig
from dinosys.factory.record import sha256_json


@dataclass
class Context:
    """What a stage sees: the config, the pipeline directory, its inputs' records, its part."""

    cfg: PipelineConfig
    out: Path
    records: dict[str, dict] = field(default_factory=dict)  # complete input stages' records
    part: tuple[int, int] | None = None

    def subst(self, text: str) -> str:
        """``{out}`` -> the pipeline directory, ``{builtin}`` -> the embedded-data folder."""
        return text.replace("{out}", str(self.out)).replace("{builtin}", self.builtin)

    @property
    def builtin(self) -> str:
        """The embedded-data folder, absolute or as given relative to the working directory."""
        return self.cfg.data.replace("{out}", str(self.out))

    def overrides(self, name: str) -> list[str]:
        """The stage's own overrides, placeholders substituted."""
        return [self.subst(o) for o in stage_config(self.cfg, name).overrides]

    def dir(self, name: str) -> Path:
        """The stage's folder ``OUT/<name>``."""
        return self.out / name


@dataclass(frozen=True)
class Stage:
    """One registered stage."""

    name: str
    inputs: tuple[str, ...]  # earlier stages whose outputs it reads (those enabled)
    run: Callable[[Context], dict]  # returns the record's result: outputs and key numbers
    help: str
    collective: bool = False  # every rank of a torchrun / Slurm job runs it (training)
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True
    # the key numbers the summary table shows: label -> path into the record
    numbers: tuple[tuple[str, str], ...] = ()


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add a stage to the registry (order of registration = pipeline order)."""
    if stage.name in STAGES:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    STAGES[stage.name] = stage
    return stage


def get_stage(name: str) -> Stage:
    """A registered stage by name (UserError naming the stages otherwise)."""
    load_stages()
    if name not in STAGES:
        raise UserError(f"unknown stage '{name}'; the stages are {', '.join(STAGES)}")
    return STAGES[name]


def load_stages() -> dict[str, Stage]:
    """The registry (every stage module imported), in pipeline order: each stage after its
    inputs, otherwise in registration order."""
    from dinosys.factory import stages_data, stages_models, stages_train  # noqa: F401

    ordered: dict[str, Stage] = {}

    def visit(name: str) -> None:
        if name not in ordered:
            for dep in STAGES[name].inputs:
                visit(dep)
            ordered[name] = STAGES[name]

    for name in list(STAGES):
        visit(name)
    return ordered


def stage_config(cfg: PipelineConfig, name: str) -> StageConfig:
    """The config section of stage ``name`` (the pool has none: a default one)."""
    section = getattr(cfg, name, None)
    return section if isinstance(section, StageConfig) else StageConfig()


def is_enabled(cfg: PipelineConfig, name: str) -> bool:
    """Whether stage ``name`` runs in this pipeline."""
    stage = get_stage(name)
    return stage_config(cfg, name).enabled and stage.enabled(cfg)


def active_inputs(cfg: PipelineConfig, name: str) -> list[str]:
    """The inputs of stage ``name`` that are enabled (a disabled input is not waited for: the
    stage's recipe then supplies what it would have)."""
    return [i for i in get_stage(name).inputs if is_enabled(cfg, i)]


def stage_digest(cfg: PipelineConfig, name: str, records: dict[str, dict]) -> str:
    """The digest a stage's record must carry: its config section without resources, its
    recipe file's text, the embedded-data folder, and its inputs' digests."""
    section = to_dict(stage_config(cfg, name))
    section.pop("resources", None)
    recipe = section.get("recipe")
    recipe_text = find_config(recipe).read_text() if recipe else None
    extra = to_dict(cfg.pool) if name == "pool" else None
    return sha256_json({"stage": name, "config": section, "recipe": recipe_text, "extra": extra,
                        "data": cfg.data,
                        "inputs": {k: records[k]["digest"] for k in sorted(records)}})


def ensure_builtin(ctx: Context, texts: list[str]) -> None:
    """Build the embedded sets that ``{builtin}/<set>`` in ``texts`` names (when missing)."""
    sets = sorted({m for t in texts for m in re.findall(r"\{builtin\}/(?:shards/)?(\w+)", t)})
    if sets:
        from dinosys.data.builtin import build_builtin

        build_builtin(Path(ctx.builtin), sets=sets)


def plan(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The enabled stages in order, with their inputs and Slurm resources: what a launcher
    needs to submit one job per stage with dependencies."""
    out = []
    for name, stage in load_stages().items():
        if not is_enabled(cfg, name):
            continue
        res: Resources = stage_config(cfg, name).resources
        out.append({"stage": name, "inputs": active_inputs(cfg, name),
                    "collective": stage.collective, "resources": to_dict(res)})
    return out
