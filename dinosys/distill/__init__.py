"""Knowledge distillation: a frozen teacher (``teacher``), students on rank subgroups
(``ranks``), one student's objective (``student``) and the ``distill`` training task
(``task``), which runs on the shared training path (:mod:`dinosys.train.run`).

From Python (e.g. a pipeline stage)::

    from dinosys.distill import distill
    summary = distill("mnist_demo_cpu", "runs/distill", ["teacher.path=runs/mnist"])
    summary["exports"]  # student name -> RUN/export/<name>
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The task registry first: it imports dinosys.distill.task, which needs this package's config
# module; importing dinosys.distill.config first would otherwise meet a half-built module.
import dinosys.train.tasks  # noqa: F401


def distill(config: str | Path, run_dir: str | Path, overrides: Sequence[str] = ()
            ) -> dict[str, Any]:
    """``dinosys distill CONFIG --out RUN_DIR key=value ...`` in this process (or on every
    rank under torchrun / Slurm): load the recipe with the ``distill`` task's schema and run
    it through :func:`dinosys.train.run.run_train`; return the run summary (``status``,
    ``exports``, ``evaluations``, ``students`` ...). Bad input raises a one-line UserError
    before anything is written."""
    from dinosys.train.run import run_train
    from dinosys.train.tasks import load_task_config

    cfg = load_task_config(str(config), list(overrides), default_task="distill")
    return run_train(cfg, Path(run_dir))
