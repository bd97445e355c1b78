"""The pipeline config (``configs/pipeline/*.yaml``): which stages run, each stage's recipe and
overrides, and the resources a Slurm job of that stage asks for.

Loaded like every dinosys config (:func:`dinosys.config.load_config`, ``kind="pipeline"``):
dataclass defaults <- ``_base_`` files <- the file <- ``key=value`` overrides, one-line errors.
In a stage's ``overrides`` and in ``data``, ``{out}`` is the pipeline directory and
``{builtin}`` the embedded-data folder (``data``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dinosys.config import Section, check_bounds, check_choice
from dinosys.errors import ConfigError


@dataclass
class Resources(Section):
    """What one Slurm job of a stage asks for (``launch/submit.py pipeline``); a local run
    ignores it, except ``parts`` (the curation array's tasks)."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU tasks (tasks_per_node of them); else one task per GPU
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    timeout_min: int = 60
    partition: str | None = None
    parts: int = 1  # curate: array tasks, each `--stage curate --part i/parts` (run together)

    def check(self, prefix: str) -> None:
        """Counts are positive (``prefix``: the stage's key, e.g. ``pretrain.resources``); the
        pipeline calls it, so the error names the stage."""
        check_bounds(self, prefix, {"nodes": (1, None), "gpus_per_node": (0, None),
                                    "tasks_per_node": (1, None), "cpus_per_task": (1, None),
                                    "mem_gb": (1, None), "timeout_min": (1, None),
                                    "parts": (1, None)})


@dataclass
class StageConfig(Section):
    """One stage: on or off, its recipe (a name under configs/ or a YAML path), overrides on top
    of the recipe (after the inputs the pipeline wires in), its job resources."""

    enabled: bool = True
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)


@dataclass
class PoolConfig(Section):
    """A raw pool built from the embedded data before curation (the demo), or none: the
    curation recipe's own ``sources`` are the pool."""

    kind: str = "none"  # none | mnist_planted (dinosys/factory/demo_pool.py)
    near_duplicates: int = 200
    contamination: int = 100
    seed: int = 0

    def validate(self) -> None:
        """A known kind, non-negative counts."""
        check_choice(self.kind, ("none", "mnist_planted"), "pool.kind")
        check_bounds(self, "pool", {"near_duplicates": (0, None), "contamination": (0, None)})


@dataclass
class EvaluateConfig(StageConfig):
    """The evaluation suites: ``suite`` on every image backbone (teacher, students),
    ``text_suite`` on the text-aligned model (zero-shot)."""

    suite: str = "default_suite"
    text_suite: str | None = None


@dataclass
class ExportConfig(StageConfig):
    """The final exports (``OUT/export/<model>/``) with the provenance chain."""

    formats: list[str] = field(default_factory=lambda: ["native", "timm", "hf", "onnx"])
    text_formats: list[str] = field(default_factory=lambda: ["native", "open_clip"])


@dataclass
class PipelineConfig(Section):
    """`dinosys pipeline CONFIG`: curate -> pretrain -> distill, text_align -> evaluate -> export.
    """

    name: str = "pipeline"
    out: str | None = None  # default pipeline directory (``--out`` wins)
    data: str = "data/builtin"  # the embedded data ({builtin})
    pool: PoolConfig = field(default_factory=PoolConfig)
    curate: StageConfig = field(default_factory=StageConfig)
    pretrain: StageConfig = field(default_factory=StageConfig)
    distill: StageConfig = field(default_factory=StageConfig)
    text_align: StageConfig = field(default_factory=StageConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> None:
        """Resources are positive; every enabled stage that runs a recipe names one."""
        for name in ("curate", "pretrain", "distill", "text_align", "evaluate", "export"):
            getattr(self, name).resources.check(f"{name}.resources")
        for name in ("curate", "pretrain", "distill", "text_align"):
            stage = getattr(self, name)
            if stage.enabled and not stage.recipe:
                raise ConfigError(f"config key '{name}.recipe': stage {name} is enabled but "
                                  f"names no recipe (set {name}.recipe or {name}.enabled=false)")
