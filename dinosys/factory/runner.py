"""Run a pipeline: every enabled stage in order, skipping the complete ones, or exactly one
stage (what one Slurm job of ``launch/submit.py pipeline`` runs). Writes ``OUT/summary.json``
(all stages) and returns it; :func:`format_table` is the table ``dinosys pipeline`` prints."""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

from dinosys.errors import UserError
from dinosys.factory.config import PipelineConfig
from dinosys.factory.parallel import run_concurrently
from dinosys.factory.record import read_record, write_record
from dinosys.factory.stages import (
    Context,
    active_inputs,
    get_stage,
    is_enabled,
    load_stages,
    stage_digest,
)

log = logging.getLogger(__name__)


def load_pipeline(config: str, overrides: list[str] = ()) -> PipelineConfig:  # type: ignore[assignment]
    """The validated pipeline config of a YAML path or a name under configs/pipeline/."""
    from dinosys.config import load_config

    return load_config(PipelineConfig, config, list(overrides), kind="pipeline")


def _rank() -> tuple[int, int]:
    from dinosys.distributed.env import detect_layout

    _, rank, world, _ = detect_layout()
    return rank, world


def input_records(cfg: PipelineConfig, out: Path, name: str) -> dict[str, dict]:
    """The records of the stage's enabled inputs; UserError naming the first that is not
    complete (run that stage first)."""
    records = {}
    for dep in active_inputs(cfg, name):
        record = read_record(out, dep)
        if record is None:
            raise UserError(f"stage {name} needs stage {dep} complete in {out} (no "
                            f"{dep}/COMPLETE.json): run `dinosys pipeline ... --stage {dep}` first")
        records[dep] = record
        records.update({k: v for k, v in input_records(cfg, out, dep).items()
                        if k not in records})
    return records


def _same_digest(out: Path, name: str, record: dict, digest: str) -> None:
    if record["digest"] != digest:
        raise UserError(f"stage {name} in {out} is complete with another configuration or "
                        f"other inputs: use a new --out, or delete {out / name} to redo it")


def stage_complete(cfg: PipelineConfig, out: Path, name: str) -> bool:
    """Whether stage ``name`` is complete in ``out`` for this config: its record is there, its
    inputs are complete and the digests agree (UserError when the record has another digest,
    as when the stage would run). A launcher skips complete stages at submission."""
    done = read_record(Path(out), name)
    if done is None:
        return False
    try:
        records = input_records(cfg, Path(out), name)
    except UserError:  # an input is not complete (deleted to be redone): neither is this
        return False
    _same_digest(Path(out), name, done, stage_digest(
        cfg, name, {k: records[k] for k in active_inputs(cfg, name)}))
    return True


def run_stage(cfg: PipelineConfig, out: Path, name: str,
              part: tuple[int, int] | None = None) -> dict:
    """Run stage ``name`` unless it is complete; returns ``{"stage", "status": "skipped" |
    "ran" | "incomplete" | "part", "seconds", "record"}``."""
    stage = get_stage(name)
    if part is not None and name != "curate":
        raise UserError(f"--part: only the curate stage is split into parts (not {name})")
    records = input_records(cfg, out, name)
    digest = stage_digest(cfg, name, {k: records[k] for k in active_inputs(cfg, name)})
    done = read_record(out, name)
    if done is not None:
        _same_digest(out, name, done, digest)
        return {"stage": name, "status": "skipped", "seconds": 0.0, "record": done}
    rank, world = _rank()
    if world > 1 and not stage.collective and name != "curate":
        raise UserError(f"stage {name} runs in one process; it got {world} ranks (give its job "
                        f"one task)")
    log.info("pipeline %s: stage %s", cfg.name, name)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    result = stage.run(Context(cfg, out, records, part))
    seconds = time.perf_counter() - t0
    # this process and its finished children (loader workers, the curation subprocess)
    result["cpu_seconds"] = round(_cpu_seconds() - cpu0, 1)
    result["load1_at_end"] = round(os.getloadavg()[0], 2)
    if result.get("incomplete"):
        return {"stage": name, "status": "incomplete", "seconds": round(seconds, 1),
                "record": result}
    if result.get("part_only") or rank != 0:
        return {"stage": name, "status": "part", "seconds": round(seconds, 1), "record": result}
    record = write_record(out, name, digest, result, seconds)
    return {"stage": name, "status": "ran", "seconds": round(seconds, 1), "record": record}


class LoadSampler:
    """The 1-minute load average every ``every`` seconds in a thread (others share the cores:
    a wall time means little without it)."""

    def __init__(self, every: float = 5.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True)

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        """Mean and max of the sampled 1-minute load averages."""
        return {"load1_mean": round(sum(self.samples) / len(self.samples), 2),
                "load1_max": round(max(self.samples), 2), "samples": len(self.samples),
                "cpus": os.cpu_count()}


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_pipeline(cfg: PipelineConfig, out: Path, only: str | None = None,
                 part: tuple[int, int] | None = None, jobs: int = 1) -> dict:
    """Every enabled stage in order (or only ``only``), up to ``jobs`` independent stages at
    once (:mod:`dinosys.factory.parallel`); writes ``OUT/summary.json`` when it ran the whole
    pipeline, and returns the summary."""
    from dinosys.atomic import write_atomic

    out = Path(out).resolve()  # the provenance names absolute paths
    if only is not None:
        if not is_enabled(cfg, get_stage(only).name):
            raise UserError(f"stage {only} is disabled in this pipeline ({only}.enabled=false)")
        return run_stage(cfg, out, only, part)
    if part is not None:
        raise UserError("--part needs --stage curate (one array task of the curation)")
    if _rank()[1] > 1:
        raise UserError("a multi-process job runs one stage: add --stage NAME")
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: need at least 1")
    out.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    rows: list[dict] = []
    pending = [name for name in load_stages() if is_enabled(cfg, name)]
    with LoadSampler() as load:
        while pending:
            ready = [n for n in pending if not set(active_inputs(cfg, n)) & set(pending)]
            todo = [n for n in ready if not stage_complete(cfg, out, n)]
            if len(todo) > 1 and jobs > 1:
                batch = todo[:jobs]
                batch_rows = run_concurrently(cfg, out, batch)
            else:
                batch = [ready[0]]
                c0 = _cpu_seconds()
                batch_rows = [run_stage(cfg, out, batch[0])]
                batch_rows[0]["cpu_seconds"] = round(_cpu_seconds() - c0, 1)
            for row in batch_rows:
                if row["status"] == "skipped":  # complete earlier: what it took then
                    row["recorded_seconds"] = row["record"].get("seconds")
                pending.remove(row["stage"])
            rows += batch_rows
            if any(r["status"] == "incomplete" for r in batch_rows):
                break
    summary = {"pipeline": cfg.name, "out": str(out),
               "status": "finished" if all(r["status"] in ("ran", "skipped") for r in rows)
               else "incomplete",
               "wall_seconds": round(time.perf_counter() - t0, 1),
               "cpu_seconds": round(_cpu_seconds() - cpu0, 1), "load": load.summary(),
               "stages": {r["stage"]: {"status": r["status"], "seconds": r["seconds"],
                                       "cpu_seconds": r["cpu_seconds"],
                                       "recorded_seconds": r.get("recorded_seconds"),
                                       "numbers": key_numbers(r["stage"], r["record"])}
                          for r in rows}}
    write_atomic(out / "summary.json", _json(summary))
    return summary


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"


def key_numbers(name: str, record: dict) -> dict:
    """The numbers of a stage's record the summary shows (its registered ``numbers``, plus the
    evaluation metrics per model)."""
    numbers: dict[str, Any] = {}
    for label, key in get_stage(name).numbers:
        if record.get(key) is not None:
            numbers[label] = record[key]
    for model, res in (record.get("models") or {}).items():
        for metric, value in (res.get("metrics") or {}).items():
            if "/top1" in metric:  # the headline: top-1 of each evaluation
                numbers[f"{model} {metric}"] = value
        if "formats" in res:
            numbers[model] = ",".join(res["formats"])
    return numbers


def format_table(summary: dict) -> list[str]:
    """One line per stage: name, status, wall and CPU seconds, key numbers."""
    lines = [f"{'stage':<11} {'status':<8} {'wall':>7} {'cpu':>7}  key numbers"]
    for name, row in summary["stages"].items():
        nums = ", ".join(f"{k} {_fmt(v)}" for k, v in row["numbers"].items())
        if row.get("recorded_seconds") is not None:
            nums += f" (ran earlier in {row['recorded_seconds']:.0f}s)"
        lines.append(f"{name:<11} {row['status']:<8} {row['seconds']:>6.0f}s "
                     f"{row['cpu_seconds']:>6.0f}s  {nums}")
    load = summary["load"]
    lines.append(f"{'total':<11} {summary['status']:<8} {summary['wall_seconds']:>6.0f}s "
                 f"{summary['cpu_seconds']:>6.0f}s  load average {load['load1_mean']} (max "
                 f"{load['load1_max']}) on {load['cpus']} cores")
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)
