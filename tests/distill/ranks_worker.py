"""torchrun worker: teacher sharded over the world, outputs exchanged to student subgroups.

Each rank checks its own received rows against a single-process computation on the whole
global batch and writes ``OUT/rank{r}.json``; the test reads them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dinosys.distill.ranks import build_layout, to_crop_major, to_image_major
from dinosys.models import create_backbone


def main(out: Path, spec: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ranges = json.loads(spec)
    layout = build_layout(ranges, world, rank)
    (name,) = layout.local_students
    per_rank = 3
    g = per_rank * world
    images = torch.randn(2 * g, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    # the global batch, crop-major over G images as a single process would hold it
    full = to_crop_major(to_image_major(images, 2))
    torch.manual_seed(0)
    teacher = create_backbone("vit_tiny", patch_size=14, embed_dim=32, depth=2,
                              num_heads=2).eval()
    with torch.no_grad():
        ref = teacher(full)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for blk in teacher.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(teacher, mesh=mesh)
    # this rank's slice of the global batch, crop-major as the loader gives it
    mine = to_image_major(images, 2)[rank * per_rank:(rank + 1) * per_rank]
    local = to_crop_major(mine)
    with torch.no_grad():
        out_t = teacher(local)
    cls = layout.exchange(to_image_major(out_t["x_norm_clstoken"], 2))
    patches = layout.exchange(to_image_major(out_t["x_norm_patchtokens"], 2))
    crops = layout.exchange(mine)
    masks = layout.exchange(torch.arange(per_rank * 4).reshape(per_rank, 4).add(
        rank * per_rank * 4).remainder(3).eq(0))
    chunk = layout.student_chunk(name, rank, g)
    want_cls = to_image_major(ref["x_norm_clstoken"], 2)[chunk.start:chunk.stop]
    want_patch = to_image_major(ref["x_norm_patchtokens"], 2)[chunk.start:chunk.stop]
    want_masks = torch.arange(g * 4).reshape(g, 4).remainder(3).eq(0)[chunk.start:chunk.stop]
    result = {
        "rank": rank, "student": name, "chunk": [chunk.start, chunk.stop],
        "rows": cls.shape[0],
        "cls_diff": float((cls - want_cls).abs().max()),
        "patch_diff": float((patches - want_patch).abs().max()),
        "crops_equal": bool(torch.equal(crops, to_image_major(images, 2)[chunk.start:chunk.stop])),
        "masks_equal": bool(torch.equal(masks, want_masks)), "mask_dtype": str(masks.dtype),
        "group_size": (dist.get_world_size(layout.groups[name])
                       if layout.groups[name] is not None else world),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
