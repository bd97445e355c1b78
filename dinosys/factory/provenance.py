"""The provenance chain every factory export carries (``config.json`` ``provenance`` and the
model card): the curation manifest (path, SHA-256, kept / removed counts), the training run
(directory, config SHA-256, recipe, steps), the teacher of a distilled or text-aligned model
(export path, weights SHA-256), the evaluation results, and the pipeline config itself.
``dinosys info MODEL`` prints it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dinosys.errors import UserError

CURATION_KEYS = ("manifest", "manifest_sha256", "shards", "pool", "kept",
                 "removed_near_duplicates", "removed_contamination", "removed_exact_duplicates",
                 "removed_other")


def chain_for(ctx: Any, name: str, stage: str) -> dict:
    """The chain of model ``name`` trained by ``stage`` of the pipeline in ``ctx``."""
    from dinosys.config import to_dict
    from dinosys.factory.record import sha256_json

    chain: dict[str, Any] = {"pipeline": {
        "name": ctx.cfg.name, "dir": str(ctx.out), "config_sha256": sha256_json(to_dict(ctx.cfg))}}
    curate = ctx.records.get("curate")
    if curate is not None:
        chain["curation"] = {k: curate[k] for k in CURATION_KEYS if k in curate}
    run = ctx.records[stage]
    chain["training"] = {"stage": stage, "run_dir": run["run_dir"], "recipe": run["recipe"],
                         "config_sha256": run["config_sha256"], "steps": run["steps"]}
    if run.get("teacher"):
        chain["teacher"] = run["teacher"]
    evaluation = ctx.records.get("evaluate", {}).get("models", {}).get(name)
    if evaluation is not None:
        chain["evaluation"] = evaluation["metrics"]
    return chain


def read_model_info(model: str | Path) -> dict:
    """config.json of an exported model (a run directory: its first export) with its path."""
    path = Path(model)
    candidates = [path, path / "export"]
    if (path / "export").is_dir():
        candidates += sorted(p for p in (path / "export").iterdir() if p.is_dir())
    for cand in candidates:
        config = cand / "config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text())
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read {config}: {exc}") from exc
            return {"path": str(cand), "config": data}
    raise UserError(f"{model}: no exported model (config.json) there or under export/")


def info_summary(model: str | Path) -> dict:
    """What ``dinosys info`` reports: architecture, parameters, provenance, evaluation."""
    found = read_model_info(model)
    config = found["config"]
    arch = config.get("architecture", {})
    is_clip = config.get("model_type") == "clip"
    image = arch.get("image", {}).get("backbone", {}) if is_clip else arch
    return {"model": found["path"], "model_type": config.get("model_type"),
            "arch": image.get("arch"), "embed_dim": image.get("embed_dim"),
            "depth": image.get("depth"), "patch_size": image.get("patch_size"),
            "img_size": image.get("img_size"), "num_parameters": config.get("num_parameters"),
            "provenance": config.get("provenance")}


def format_info(info: dict) -> list[str]:
    """The readable block of ``dinosys info``."""
    lines = [f"model:      {info['model']} ({info['model_type']}: {info['arch']}, "
             f"{info['embed_dim']}-d, {info['depth']} blocks, patch {info['patch_size']} at "
             f"{info['img_size']} px, {info['num_parameters']:,} parameters)"]
    chain = info.get("provenance")
    if not chain:
        return lines + ["provenance: none recorded (exported outside `dinosys pipeline`)"]
    pipe = chain.get("pipeline", {})
    lines.append(f"pipeline:   {pipe.get('name')} in {pipe.get('dir')} (config sha256 "
                 f"{str(pipe.get('config_sha256'))[:16]})")
    cur = chain.get("curation")
    if cur:
        lines.append(f"curation:   {cur.get('manifest')} (sha256 {cur['manifest_sha256'][:16]}): "
                     f"kept {cur.get('kept')} of {cur.get('pool')}, removed "
                     f"{cur.get('removed_near_duplicates')} near-duplicates, "
                     f"{cur.get('removed_contamination')} eval contamination, "
                     f"{cur.get('removed_exact_duplicates')} exact duplicates")
    train = chain.get("training", {})
    lines.append(f"training:   {train.get('stage')} {train.get('recipe')} in "
                 f"{train.get('run_dir')}, {train.get('steps')} steps (config sha256 "
                 f"{str(train.get('config_sha256'))[:16]})")
    teacher = chain.get("teacher")
    if teacher:
        lines.append(f"teacher:    {teacher.get('path')} (weights sha256 "
                     f"{str(teacher.get('sha256'))[:16]})")
    for key, value in sorted((chain.get("evaluation") or {}).items()):
        lines.append(f"evaluation: {key} = {value:.4f}" if isinstance(value, float)
                     else f"evaluation: {key} = {value}")
    return lines
