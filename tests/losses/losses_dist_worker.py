"""Multi-rank check of the loss collectives; run by test_losses_multirank.py under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 losses_dist_worker.py

Every rank builds the same global batch, keeps its (deliberately uneven) slice, and checks that
the distributed result equals the single-process result on the whole batch. The single-process
reference runs in the same processes on a one-rank group, so no collective reaches the others.
Exits non-zero (assertion) on any mismatch; prints one "OK" line per rank.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dinosys.losses import Centering, koleo_loss, sinkhorn_knopp
from dinosys.models.heads import DINOHead

ATOL = 1e-6


def _split(total: int, world: int, rank: int, sizes: list[int]) -> slice:
    assert sum(sizes) == total and len(sizes) == world
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def check_sinkhorn(rank: int, world: int, solo: dist.ProcessGroup) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(13, 10, generator=g) * 2  # 13 rows: 5 on rank 0, 8 on rank 1
    rows = _split(13, world, rank, [5, 8])
    expected = sinkhorn_knopp(logits, 0.05, group=solo)
    got = sinkhorn_knopp(logits[rows], 0.05)
    torch.testing.assert_close(got, expected[rows], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(got.shape[0]))

    # iBOT masked tokens: counts differ per rank (here 7 and 0 tokens), computed ...
    tokens = torch.randn(7, 10, generator=g)
    mine = tokens if rank == 0 else tokens[:0]
    expected = sinkhorn_knopp(tokens, 0.07, group=solo)
    got = sinkhorn_knopp(mine, 0.07)
    torch.testing.assert_close(got, expected[: mine.shape[0]], atol=ATOL, rtol=0)
    # ... or passed, for inputs padded to a fixed number of rows (3 + 4 real tokens of 6).
    counts = [3, 4]
    rows = _split(7, world, rank, counts)
    padded = torch.cat([tokens[rows], torch.full((6 - counts[rank], 10), float("nan"))])
    got = sinkhorn_knopp(padded, 0.07, n_valid=torch.tensor(counts[rank]))
    torch.testing.assert_close(got[: counts[rank]], expected[rows], atol=ATOL, rtol=0)
    assert torch.count_nonzero(got[counts[rank]:]) == 0


def check_centering(rank: int, world: int, solo: dist.ProcessGroup) -> None:
    g = torch.Generator().manual_seed(1)
    reference = Centering(6, momentum=0.8, group=solo)
    synced, overlapped = Centering(6, momentum=0.8), Centering(6, momentum=0.8)
    for step in range(3):
        logits = torch.randn(9 + step, 6, generator=g) * 3
        rows = _split(logits.shape[0], world, rank, [2 + step, 7])
        torch.testing.assert_close(
            overlapped.softmax_centered(logits[rows], 0.04),
            reference.softmax_centered(logits[rows], 0.04), atol=ATOL, rtol=0,
        )
        reference.update(logits)
        synced.update(logits[rows])
        overlapped.update(logits[rows], async_op=True)
        torch.testing.assert_close(synced.center, reference.center, atol=ATOL, rtol=0)
    torch.testing.assert_close(overlapped.state_dict()["center"], reference.center,
                               atol=ATOL, rtol=0)


def check_koleo(rank: int, world: int, solo: dist.ProcessGroup) -> None:
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(11, 5, generator=g, dtype=torch.float64)
    feats[9] = feats[1]  # a duplicate across ranks
    full = feats.clone().requires_grad_(True)
    expected = koleo_loss(full, distributed=True, group=solo)  # one rank: plain local KoLeo
    torch.testing.assert_close(expected, koleo_loss(full))
    (full_grad,) = torch.autograd.grad(expected, full)

    rows = _split(11, world, rank, [4, 7])
    local = feats[rows].clone().requires_grad_(True)
    loss = koleo_loss(local, distributed=True)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / world, expected.detach(), atol=1e-12, rtol=0)
    # Rank-averaged parameter gradients see sum_r dloss_r/dx = world * dL/dx per local row.
    torch.testing.assert_close(local.grad, world * full_grad[rows], atol=1e-12, rtol=0)
    assert koleo_loss(local) != loss  # the local-only variant really differs here


def check_fsdp2_head(rank: int, world: int) -> None:
    """The weight-normalised head sharded with FSDP2 computes what the plain head computes."""
    torch.manual_seed(3)  # same init on every rank
    # float64: the sharded and the plain head sum gradients in different orders, and float32
    # rounding of that (~3e-6 here) depends on the CPU's BLAS kernels, not on the code under test
    reference = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4).double()
    sharded = copy.deepcopy(reference)
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rows = _split(6, world, rank, [2, 4])
    out = sharded(x[rows])
    torch.testing.assert_close(out, reference(x[rows]), atol=ATOL, rtol=0)
    out.square().sum().backward()
    # FSDP averages gradients over ranks: the reference is the full-batch loss / world.
    (reference(x).square().sum() / world).backward()
    for (name, p_ref), p_sharded in zip(reference.named_parameters(), sharded.parameters()):
        torch.testing.assert_close(p_sharded.grad.full_tensor(), p_ref.grad, atol=ATOL, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "this check is written for 2 ranks"
    solo_groups = [dist.new_group([r]) for r in range(world)]
    solo = solo_groups[rank]
    check_sinkhorn(rank, world, solo)
    check_centering(rank, world, solo)
    check_koleo(rank, world, solo)
    check_fsdp2_head(rank, world)
    dist.barrier()
    print(f"rank {rank}: OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
