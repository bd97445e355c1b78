"""`dinosys demo`: the main job end to end on the embedded data, on a CPU in minutes.

Builds the builtin MNIST, trains the ``mnist_tiny_cpu`` recipe, evaluates the exported teacher
with kNN on MNIST val next to the same architecture at random initialisation, and writes
``RUN/demo_summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dinosys.atomic import write_atomic
from dinosys.config import load_config
from dinosys.train.tasks.ssl import SSLConfig

log = logging.getLogger(__name__)

RECIPE = "mnist_tiny_cpu"


def run_demo(run_dir: Path, data_dir: Path = Path("data/builtin"),
             overrides: Sequence[str] = ()) -> dict:
    """Build data, train, evaluate; return (and write to ``run_dir/demo_summary.json``) a summary
    with the training time and the kNN top-1 of the trained and the random-init backbone."""
    from dinosys.data.builtin import build_builtin
    from dinosys.eval.knn import run_knn
    from dinosys.models import backbone_from_config
    from dinosys.train.run import run_train

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    t0 = time.perf_counter()
    build_builtin(data_dir, sets=["mnist"])
    train_dir, val_dir = data_dir / "mnist" / "train", data_dir / "mnist" / "val"
    cfg = load_config(SSLConfig, RECIPE, [
        f"data.sources=[{{path: {train_dir}}}]", f"eval.knn_train={train_dir}",
        f"eval.knn_val={val_dir}", *overrides], kind="train")
    t_train = time.perf_counter()
    train = run_train(cfg, run_dir)
    train_s = time.perf_counter() - t_train
    if train["status"] != "finished":
        return {"status": train["status"], "train": train}
    trained = run_knn(str(run_dir), train_dir, val_dir)
    torch.manual_seed(0)
    random_model = backbone_from_config(cfg.model).eval()
    baseline = run_knn(random_model, train_dir, val_dir)
    summary = {
        "status": "finished", "recipe": RECIPE, "run_dir": str(run_dir),
        "train_seconds": round(train_s, 1), "steps": train["step"],
        "knn_top1": trained["top1"], "knn_top1_random_init": baseline["top1"],
        "knn_top5": trained.get("top5"), "n_train": trained["n_train"],
        "n_val": trained["n_val"], "export": train.get("export"),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    write_atomic(run_dir / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("demo: trained %d steps in %.0f s; kNN top-1 %s (random init %s)", train["step"],
             train_s, trained["top1"], baseline["top1"])
    return summary
