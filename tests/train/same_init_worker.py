"""torchrun worker: every rank's sharded (or replicated) task starts from the weights a single
process builds. Usage: ``same_init_worker.py OUT TASK_CONFIG FSDP`` -> ``OUT/rank{r}.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dinosys.distributed.env import init_distributed, seed_everything
from dinosys.train.run import build_task_same_on_every_rank
from dinosys.train.tasks import build_task, load_task_config


def main(out: Path, config: str, fsdp: str) -> None:
    cfg = load_task_config(config, [f"dist.fsdp={fsdp}", "dist.param_dtype=fp32"])
    env = init_distributed()
    seed_everything(cfg.seed, 0)  # what a single process (rank 0) seeds
    reference = {name: dict(module.named_parameters())
                 for name, module in build_task(cfg, env).trainable_modules().items()}
    seed_everything(cfg.seed, env.rank)  # as the run does
    task = build_task_same_on_every_rank(cfg, env)
    task.shard()
    worst, checked = 0.0, 0
    for name, module in task.trainable_modules().items():
        for key, param in module.named_parameters():
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            worst = max(worst, float((full.detach() - reference[name][key].detach())
                                     .abs().max()))
            checked += 1
    (out / f"rank{env.rank}.json").write_text(json.dumps({"max_diff": worst,
                                                          "checked": checked}))
    env.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
