"""Run under torchrun: the EMA on FSDP2 local shards equals the EMA of the full tensors."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dinosys.train.ema import ema_pairs, ema_update


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # same weights on every rank
    student = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 5))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    expected = {n: 0.7 * t + 0.3 * s for (n, t), s in
                zip(teacher.state_dict().items(), student.state_dict().values())}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for model in (student, teacher):
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    t_local, s_local = ema_pairs(teacher, student)
    assert any(t.numel() < full.numel() for t, full in
               zip(t_local, (p.full_tensor() for p in teacher.parameters()))), "not sharded"
    ema_update(t_local, s_local, 0.7)
    for name, param in teacher.named_parameters():
        torch.testing.assert_close(param.full_tensor(), expected[name], msg=name)
    dist.barrier()
    if dist.get_rank() == 0:
        print("EMA_SHARDS_OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
