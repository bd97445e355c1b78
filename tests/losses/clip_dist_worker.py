"""Multi-rank check of the CLIP and SigLIP losses; run by test_clip_losses.py under torchrun.

Every rank builds the same global batch (uneven per-rank slices, repeated captions), computes its
share of the loss on its slice, backpropagates, and checks that the rank average of the loss and
of the gradients equals the single-process loss and gradients on the whole batch. The reference
runs in the same process on a one-rank group. Prints "rank R: OK" per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinosys.losses._dist import gather_rows_with_grad
from dinosys.losses.clip import clip_loss
from dinosys.losses.siglip import siglip_loss

SIZES = {2: [5, 7], 4: [2, 4, 3, 3]}


def _batch(total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(total, 16, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(total, 16, generator=g, dtype=torch.float64), dim=1)
    keys = torch.arange(total) % 5  # captions repeat across ranks
    return img, txt, keys


def _reference(fn, img, txt, keys, params, solo):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    loss = fn(img, txt, *params, keys=keys, group=solo)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, [p.grad for p in params]


def _distributed(fn, img, txt, keys, params, rows, world):
    my_img = img[rows].clone().requires_grad_()
    my_txt = txt[rows].clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    loss = fn(my_img, my_txt, *params, keys=keys[rows])
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    with torch.no_grad():
        gi, _ = gather_rows_with_grad(my_img.grad / world)
        gt, _ = gather_rows_with_grad(my_txt.grad / world)
    pgrads = []
    for p in params:
        g = p.grad.clone()
        dist.all_reduce(g)
        pgrads.append(g / world)
    return mean_loss / world, gi, gt, pgrads


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    solos = [dist.new_group([r]) for r in range(world)]
    sizes = SIZES[world]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    img, txt, keys = _batch(sum(sizes))
    scale = torch.tensor(2.659, dtype=torch.float64)
    bias = torch.tensor(-10.0, dtype=torch.float64)
    cases = {
        "clip": (clip_loss, [scale], keys),
        "clip_nokeys": (clip_loss, [scale], None),
        "siglip": (siglip_loss, [torch.tensor(2.3, dtype=torch.float64), bias], keys),
        "siglip_nokeys": (siglip_loss, [torch.tensor(2.3, dtype=torch.float64), bias], None),
    }
    for name, (fn, params, k) in cases.items():
        ref = _reference(lambda *a, keys=None, group=None, fn=fn: fn(*a, keys=keys, group=group),
                         img, txt, k, params, solos[rank])
        kk = k if k is not None else None
        if kk is None:
            got = _distributed(lambda *a, keys=None, fn=fn: fn(*a), img, txt,
                               torch.zeros(len(img), dtype=torch.long), params, rows, world)
        else:
            got = _distributed(fn, img, txt, kk, params, rows, world)
        torch.testing.assert_close(got[0], ref[0], atol=1e-10, rtol=1e-10, msg=f"{name} loss")
        torch.testing.assert_close(got[1], ref[1], atol=1e-10, rtol=1e-9, msg=f"{name} d img")
        torch.testing.assert_close(got[2], ref[2], atol=1e-10, rtol=1e-9, msg=f"{name} d txt")
        for a, b in zip(got[3], ref[3]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=f"{name} d param")
    dist.barrier()
    print(f"rank {rank}: OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
