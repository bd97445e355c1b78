"""torchrun worker for test_loader_dist.py: one SSL loader per rank, interrupted and resumed.

Each rank consumes HEAD batches, the loader state is saved (as a checkpoint would: JSON), a new
loader resumes from it and consumes the rest of the epoch; rank 0 gathers every rank's sample ids
and batch counts into OUT/result.json.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch.distributed as dist
from data_helpers import tiny_config

from dinosys.data.multicrop import build_ssl_loader


def main() -> None:
    pattern, out, head, workers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config([(pattern, 1.0)], workers=workers)
    loader = build_ssl_loader(cfg, rank, world, patch_size=8)
    per_epoch = loader.batches_per_epoch
    ids = [int(v) for b in itertools.islice(iter(loader), head) for v in b["labels"]]
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = build_ssl_loader(cfg, rank, world, patch_size=8)
    resumed.load_state_dict(state)
    batches = list(itertools.islice(iter(resumed), per_epoch - head))
    ids += [int(v) for b in batches for v in b["labels"]]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "ids": ids, "batches": head + len(batches),
                                      "per_epoch": per_epoch, "state": resumed.state_dict()})
    if rank == 0:
        (out / "result.json").write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
