"""Worker for the checkpoint tests, run under torchrun (gloo, CPU) or as one plain process.

python -m torch.distributed.run --standalone --nproc_per_node N ckpt_worker.py MODE OUT
MODE: save (train 3 steps, save, train 2 more, write references), load (load, compare,
train the same 2 steps, compare), crash (save step 1, then hang inside the commit of step 2).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from dinosys.distributed.sharded_checkpoint import CheckpointManager, consolidated_state_dict

GLOBAL_BATCH = 8
SAVE_STEP = 3


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x)).relu()


class Toy(nn.Module):
    """A backbone with a `blocks` ModuleList (what FSDP shards per block) and a head."""

    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)
        self.frozen = nn.Linear(dim, 3)  # never gets a gradient: no optimizer state (like a
        # DINO last layer frozen for the first epoch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x) + 0 * self.frozen.bias.sum()


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Toy()


def build(world: int, seed: int) -> tuple[Toy, Teacher, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    student, teacher = Toy(), Teacher()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for model in (student, teacher.backbone):
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.05)
    return student, teacher, optim


def train_step(step: int, student: Toy, teacher: Teacher, optim, rank: int, world: int) -> float:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 3, generator=gen)
    per = GLOBAL_BATCH // world
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    loss = ((student(xs) - ys) ** 2).mean()
    loss.backward()
    student.frozen.weight.grad = None
    student.frozen.bias.grad = None
    optim.step()
    optim.zero_grad(set_to_none=True)
    with torch.no_grad():  # EMA teacher
        for pt, ps in zip(teacher.backbone.parameters(), student.parameters()):
            pt.mul_(0.9).add_(ps.detach(), alpha=0.1)
    return loss.item()


def full_optim(student: Toy, optim) -> dict:
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    osd = get_optimizer_state_dict(student, optim, options=opts)
    return {f"{fqn}.{k}": v.detach().clone()
            for fqn, st in osd.get("state", {}).items() for k, v in st.items()}


def snapshot(student, teacher, optim) -> dict:
    return {"student": consolidated_state_dict(student),
            "teacher": consolidated_state_dict(teacher.backbone),
            "optim": full_optim(student, optim)}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    manager = CheckpointManager(out / "checkpoints", keep_last=2)

    if mode in ("save", "crash"):
        student, teacher, optim = build(world, seed=1)
        state = {"student": student, "teacher": teacher, "optim": optim,
                 "loss_state": {"center": torch.full((4,), 0.5), "count": 7}}
        for step in range(SAVE_STEP):
            train_step(step, student, teacher, optim, rank, world)
        torch.manual_seed(500 + rank)  # distinct per-rank RNG streams to be restored
        if mode == "crash":
            manager.save(1, state, {"seed": 7}, rank_state={"pos": rank})
            (out / f"pid_{rank}").write_text(str(os.getpid()))  # torchrun gives each its session

            def hang(*args, **kwargs):
                (out / "in_commit").write_text(str(os.getpid()))
                time.sleep(600)

            manager._commit = hang  # the test SIGKILLs every process while this sleeps
            manager.save(2, state, {"seed": 7}, rank_state={"pos": 10 + rank})
            raise SystemExit("unreachable: the crash test kills this process first")
        manager.save(SAVE_STEP, state, {"seed": 7}, rank_state={"pos": 100 * rank + SAVE_STEP})
        draws = torch.rand(3).tolist()
        ref = {"at_save": snapshot(student, teacher, optim)}
        for step in range(SAVE_STEP, SAVE_STEP + 2):
            train_step(step, student, teacher, optim, rank, world)
        ref["after"] = snapshot(student, teacher, optim)
        if rank == 0:
            torch.save(ref, out / "reference.pt")
        (out / f"draws_{rank}.json").write_text(json.dumps(draws))

    elif mode == "load":
        student, teacher, optim = build(world, seed=2)  # different init: must be overwritten
        loss_state = {"center": torch.zeros(4), "count": 0}
        state = {"student": student, "teacher": teacher, "optim": optim, "loss_state": loss_state}
        path = manager.latest()
        extra = manager.load(path, state)
        draws = torch.rand(3).tolist()
        loaded = snapshot(student, teacher, optim)
        for step in range(SAVE_STEP, SAVE_STEP + 2):
            train_step(step, student, teacher, optim, rank, world)
        after = snapshot(student, teacher, optim)
        if rank == 0:
            torch.save({"at_save": loaded, "after": after}, out / f"loaded_{world}.pt")
        result = {"path": str(path), "draws": draws, "rank_state": extra["rank_state"],
                  "rank_states": extra["rank_states"], "same": extra["same_world_size"],
                  "step": extra["step"], "seed": extra["seed"],
                  "loss_state": {"center": state["loss_state"]["center"].tolist(),
                                 "count": state["loss_state"]["count"]}}
        (out / f"load_{world}_{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
