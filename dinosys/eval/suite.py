"""``dinosys eval suite``: a YAML list of evaluations run on one model, written beside it.

A suite file is a list of entries ``{name, evaluator, <that evaluator's options>}``; ``{builtin}``
in a value is the embedded-data folder (``--data``), built there when missing, and ``{configs}``
the configs/ folder. Every entry is validated before the first one runs. Each folder is decoded
once and its features extracted once for all the entries (:mod:`dinosys.eval.feature_cache`).
The results go to ``eval/results.json`` of the model (an exported directory, or a run
directory) and, when there is an export, into its model card (README.md) as a table with the
command that reproduces each number.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dinosys.errors import UserError
from dinosys.eval.feature_cache import FeatureNeed, merge_needs, shared_features
from dinosys.eval.models import RANDOM_PREFIX, EvalModel
from dinosys.eval.registry import get_evaluator, register_evaluator

log = logging.getLogger(__name__)

DEFAULT_SUITE = "default_suite"
BUILTIN = "{builtin}"
CONFIGS = "{configs}"  # the configs/ folder (e.g. a templates file shipped beside the recipes)
CARD_BEGIN = "<!-- dinosys eval suite: begin -->"
CARD_END = "<!-- dinosys eval suite: end -->"


@dataclass
class SuiteConfig:
    """``dinosys eval suite``: several evaluations of one model, results beside the model."""

    suite: str = field(default=DEFAULT_SUITE, metadata={
        "help": "YAML list of evaluations: a path or a name under configs/eval/ (default: kNN "
                "and linear on the embedded MNIST and digits)"})
    data: str = field(default="data/builtin", metadata={
        "help": "the embedded-data folder that {builtin} stands for (built when missing)"})
    write: bool = field(default=True, metadata={
        "help": "write eval/results.json beside the model and the table into its model card"})

    def validate(self) -> None:
        """The suite file exists and every entry names an evaluator with valid options."""
        load_suite(self.suite, Path(self.data), check_paths=False)


@dataclass
class SuiteEntry:
    """One evaluation of a suite."""

    name: str
    evaluator: str
    config: Any


def _suite_file(suite: str) -> Path:
    from dinosys.config import ConfigError, find_config

    try:
        return find_config(suite, kind="eval")
    except ConfigError as exc:
        raise UserError(f"--suite: {exc}") from exc


def _substitute(value: Any, data: Path) -> Any:
    from dinosys.config import config_dir

    if isinstance(value, str):
        return value.replace(BUILTIN, str(data)).replace(CONFIGS, str(config_dir()))
    if isinstance(value, list):
        return [_substitute(v, data) for v in value]
    return value


def builtin_sets(suite: str) -> list[str]:
    """The embedded sets (mnist, digits, ...) a suite file refers to through ``{builtin}``."""
    text = _suite_file(suite).read_text()
    return sorted(set(re.findall(re.escape(BUILTIN) + r"/([A-Za-z0-9_]+)", text)))


def load_suite(suite: str, data: Path, check_paths: bool = True) -> list[SuiteEntry]:
    """The validated entries of a suite file (UserError naming the entry otherwise)."""
    from dinosys.eval.registry import validate_config

    path = _suite_file(suite)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read suite {path}: {exc}") from exc
    if not isinstance(raw, list) or not raw:
        raise UserError(f"suite {path} must be a non-empty YAML list of evaluations")
    entries = []
    for i, item in enumerate(raw):
        where = f"suite {path} entry {i + 1}"
        if not isinstance(item, dict) or "evaluator" not in item:
            raise UserError(f"{where}: needs at least `evaluator:` (and `name:`)")
        values = {k: _substitute(v, data) for k, v in item.items()
                  if k not in ("name", "evaluator")}
        evaluator = get_evaluator(str(item["evaluator"]))
        if evaluator.name == "suite":
            raise UserError(f"{where}: a suite cannot run another suite")
        try:
            cfg = evaluator.config(**values)
            if check_paths:
                validate_config(cfg)
            elif callable(getattr(cfg, "validate", None)):
                cfg.validate()
        except TypeError as exc:
            raise UserError(f"{where} ({evaluator.name}): {exc}") from exc
        except UserError as exc:
            raise UserError(f"{where} ({evaluator.name}): {exc}") from exc
        entries.append(SuiteEntry(str(item.get("name", evaluator.name)), evaluator.name, cfg))
    return entries


def result_locations(model: str) -> tuple[Path | None, Path | None]:
    """(results.json, model card) for a model spec: an export's own ``eval/`` and README.md, a
    run directory's ``eval/`` and its export's README.md; (None, None) for a random baseline
    or a checkpoint (pass ``--out`` for those)."""
    from dinosys.export.loading import is_exported_dir

    if model.startswith(RANDOM_PREFIX):
        return None, None
    path = Path(model)
    if is_exported_dir(path):
        return path / "eval" / "results.json", path / "README.md"
    if (path / "checkpoints").is_dir() or is_exported_dir(path / "export"):
        card = path / "export" / "README.md"
        return path / "eval" / "results.json", card if card.is_file() else None
    return None, None


def results_table(results: list[dict]) -> str:
    """The model card's markdown table: one row per evaluation, with its command."""
    lines = [CARD_BEGIN, "| benchmark | evaluator | results | command |", "|---|---|---|---|"]
    for r in results:
        numbers = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
        lines.append(f"| {r['name']} | {r['evaluator']} | {numbers} | `{r['command']}` |")
    lines.append(CARD_END)
    return "\n".join(lines)


def update_model_card(card: Path, table: str, when: str) -> None:
    """Put ``table`` into the card's "Evaluation results" section (replacing an earlier one)."""
    from dinosys.atomic import write_atomic

    text = card.read_text()
    block = f"{table}\n\nMeasured {when} with `dinosys eval suite`."
    pattern = re.compile(re.escape(CARD_BEGIN) + r".*?" + re.escape(CARD_END)
                         + r"(\n\nMeasured [^\n]*)?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n## Evaluation results\n\n" + block + "\n"
    write_atomic(card, text)


def _ensure_builtin(suite: str, data: Path) -> None:
    """Build the embedded sets the suite uses (rank 0; the others wait)."""
    import torch.distributed as dist

    sets = builtin_sets(suite)
    if not sets:
        return
    from dinosys.eval.features import shard_layout

    if shard_layout()[0] == 0:
        from dinosys.data.builtin import build_builtin

        try:
            build_builtin(data, sets=sets)
        except KeyError as exc:
            raise UserError(f"suite {suite}: unknown embedded set {exc}") from exc
    if shard_layout()[1] > 1:
        dist.barrier()


def _extract_shared(model: EvalModel, entries: list[SuiteEntry]) -> float:
    """Extract, once per folder, the union of the features the entries will need (each
    evaluator's ``features`` hook); their own extractions are then served from the cache.
    Returns the seconds it took."""
    from dinosys.eval.features import extract_features
    from dinosys.eval.images import load_image_folder
    from dinosys.eval.models import frozen

    t0 = time.perf_counter()
    needs: list[FeatureNeed] = []
    for entry in entries:
        hook = get_evaluator(entry.evaluator).features
        if hook is not None:
            needs += hook(model.module, entry.config)
    with frozen(model.module):
        for need in merge_needs(needs):
            images = load_image_folder(Path(need.folder), model.image_size, model.mean,
                                       model.std)
            extract_features(model.module, images, need.kinds, need.batch_size, model.device,
                             f"suite features {need.folder}", **need.options)
    return time.perf_counter() - t0


@register_evaluator("suite", SuiteConfig, help="a YAML list of evaluations; results into "
                    "eval/results.json and the model card", needs=())
def run(model: EvalModel, cfg: SuiteConfig) -> dict:
    """Every evaluation of the suite on ``model``; writes the results beside it (rank 0)."""
    from dinosys.atomic import write_atomic
    from dinosys.eval.cli import command_line
    from dinosys.eval.features import shard_layout

    t0 = time.perf_counter()
    data = Path(cfg.data)
    _ensure_builtin(cfg.suite, data)
    entries = load_suite(cfg.suite, data)
    results = []
    with shared_features() as cache:
        t_features = _extract_shared(model, entries)
        for i, entry in enumerate(entries):
            log.info("suite %d/%d: %s %s", i + 1, len(entries), entry.name, entry.evaluator)
            t = time.perf_counter()
            result = get_evaluator(entry.evaluator).run(model, entry.config)
            results.append({"name": entry.name, "evaluator": entry.evaluator,
                            "metrics": result.get("metrics", {}),
                            "command": command_line(entry.evaluator, model.name, entry.config),
                            "seconds": round(time.perf_counter() - t, 2),
                            "config": dataclasses.asdict(entry.config), "result": result})
            log.info("suite %s %s: %s (%.1f s)", entry.name, entry.evaluator,
                     results[-1]["metrics"], results[-1]["seconds"])
    log.info("suite: %d feature extractions (%.1f s before the first evaluation), %d requests "
             "served from them", cache.passes, t_features, cache.served)
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    summary = {
        "metrics": {f"{r['name']}/{r['evaluator']}/{k}": v for r in results
                    for k, v in r["metrics"].items()},
        "model": model.name, "suite": str(_suite_file(cfg.suite)), "date": when,
        "results": results, "seconds": round(time.perf_counter() - t0, 2),
        "features": {"extractions": cache.passes, "served": cache.served,
                     "shared_seconds": round(t_features, 2)},
    }
    results_json, card = result_locations(model.name) if cfg.write else (None, None)
    if shard_layout()[0] == 0:
        if results_json is not None:
            write_atomic(results_json, json.dumps(summary, indent=2, sort_keys=True,
                                                  default=str) + "\n")
        if card is not None:
            update_model_card(card, results_table(results), when)
    summary.update(results_json=str(results_json) if results_json else None,
                   model_card=str(card) if card else None)
    return summary
