"""Run under torchrun: the EMA on FSDP2 local shards equals the EMA of the full tensors."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dinosys.distributed.fsdp import reshard
from dinosys.train.ema import ema_pairs, ema_update


class Net(nn.Module):
    """Blocks sharded on their own plus a parameter owned by the root, like a ViT's cls token:
    FSDP2 keeps a root's own parameters unsharded after a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.randn(2, 6))
        self.layers = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x + self.offset.sum(0))


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # same weights on every rank
    student = Net()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    expected = {n: 0.7 * t + 0.3 * s for (n, t), s in
                zip(teacher.state_dict().items(), student.state_dict().values())}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for model in (student, teacher):
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    t_local, s_local = ema_pairs(teacher, student)
    assert any(t.numel() < full.numel() for t, full in
               zip(t_local, (p.full_tensor() for p in teacher.parameters()))), "not sharded"
    ema_update(t_local, s_local, 0.7)
    for name, param in teacher.named_parameters():
        torch.testing.assert_close(param.full_tensor(), expected[name], msg=name)
    # A forward-only teacher: FSDP2 keeps its root unsharded after forward. After reshard, an
    # EMA step writes the shards and the next forward sees the new weights (not stale copies).
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher(x)
        reshard(teacher)
        t_local, s_local = ema_pairs(teacher, student)
        ema_update(t_local, s_local, 0.5)
        # a plain (unsharded) module with the weights the teacher should now have
        reference = Net()
        s_full = {n: p.full_tensor() for n, p in student.named_parameters()}
        for name, param in reference.named_parameters():
            param.copy_(0.5 * expected[name] + 0.5 * s_full[name])
        torch.testing.assert_close(teacher(x), reference(x), msg="teacher forward after EMA")
    dist.barrier()
    if dist.get_rank() == 0:
        print("EMA_SHARDS_OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
