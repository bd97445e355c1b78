"""torchrun worker: distributed k-means over rank shards (gloo), result saved by rank 0."""

from __future__ import annotations

import sys

import numpy as np
import torch.distributed as dist

from curation.kmeans import kmeans_torch


def main(data_path: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = np.load(data_path)
    bounds = np.linspace(0, len(x), world + 1).astype(int)
    shard = x[bounds[rank]: bounds[rank + 1]].astype(np.float16)  # fp16 storage, fp32 maths
    centroids, labels = kmeans_torch(shard, 12, n_iter=8, seed=3, chunk_size=250, device="cpu")
    gathered = [None] * world
    dist.all_gather_object(gathered, (rank, labels.tolist(), centroids.tolist()))
    if rank == 0:
        all_labels = np.concatenate([np.asarray(g[1]) for g in sorted(gathered)])
        np.savez(out_path, centroids=centroids, labels=all_labels,
                 other=np.asarray(gathered[1][2]))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
