"""Independent stages at the same time on one machine (``dinosys pipeline --jobs N``): each in
its own ``dinosys pipeline RESOLVED.yaml --out OUT --stage NAME`` process, exactly the command a
Slurm job of that stage runs. On 2 cores, distillation and text alignment (both only after
pretraining) then share the machine instead of waiting for each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dinosys.atomic import write_atomic
from dinosys.config import to_yaml
from dinosys.errors import UserError
from dinosys.factory.config import PipelineConfig

RESOLVED = "pipeline.yaml"


def stage_command(config: Path, out: Path, name: str) -> list[str]:
    """The command line that runs one stage of the pipeline saved at ``config``."""
    return [sys.executable, "-m", "dinosys.cli", "pipeline", str(config), "--out", str(out),
            "--stage", name]


def run_concurrently(cfg: PipelineConfig, out: Path, names: list[str]) -> list[dict]:
    """Run ``names`` (stages whose inputs are complete) as processes at once; returns each one's
    row (``stage``, ``status``, ``seconds``, ``record``, ``cpu_seconds``) in the order given.
    UserError naming the first stage that failed, after all have ended."""
    config = out / RESOLVED
    write_atomic(config, to_yaml(cfg))  # the children load exactly this pipeline
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    procs = {name: subprocess.Popen(stage_command(config, out, name), env=env,
                                    stdout=subprocess.PIPE, text=True) for name in names}
    outputs = {name: proc.communicate()[0] for name, proc in procs.items()}
    failed = [name for name, proc in procs.items() if proc.returncode != 0]
    if failed:
        raise UserError(f"stage {failed[0]} exited with code {procs[failed[0]].returncode} "
                        f"(its error is above)")
    rows = []
    for name in names:
        lines = [ln for ln in outputs[name].splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1])
        row["cpu_seconds"] = row["record"].get("cpu_seconds", 0.0)
        rows.append(row)
    return rows
