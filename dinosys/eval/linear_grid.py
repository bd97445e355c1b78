"""A grid of linear classifiers (learning rates x feature variants) trained together on frozen
features, the way DINOv2's linear evaluation trains its 52 heads on one forward pass: every head
sees the same mini-batches; SGD with momentum, no weight decay by default, a cosine schedule to
zero. Each head of one variant is a slice of one (L, C, D) weight tensor, so a step is one
batched matmul per variant. The heads live on ``device`` (the model's: a GPU when there is one);
the features stay in host memory and each mini-batch is copied over, so a feature cache larger
than the accelerator's memory (ImageNet's: ~40 GB for ViT-g's 4-block inputs) still trains there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Variant:
    """A linear-probe input: class tokens of the last ``n_blocks`` blocks, plus the average-pooled
    patch tokens of the last block when ``avgpool``."""

    n_blocks: int
    avgpool: bool

    @property
    def name(self) -> str:
        return f"blocks{self.n_blocks}" + ("_avgpool" if self.avgpool else "")

    def inputs(self, feats: dict[str, Tensor], index: Tensor | None = None) -> Tensor:
        """(n, dim) inputs from ``feats`` (``blocks_cls`` (n, N, D), ``blocks_patch_mean``)."""
        cls = feats["blocks_cls"] if index is None else feats["blocks_cls"][index]
        parts = [cls[:, -self.n_blocks:].flatten(1)]
        if self.avgpool:
            patch = feats["blocks_patch_mean"]
            parts.append((patch if index is None else patch[index])[:, -1])
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def dim(self, feature_dim: int) -> int:
        return feature_dim * (self.n_blocks + int(self.avgpool))


class LinearGrid:
    """``len(lrs)`` linear heads for each variant, trained on the same mini-batches.

    The cross-entropy gradient is computed in closed form (``softmax - onehot``), not by
    autograd: a step is two batched matmuls per variant, which keeps 52 small heads cheap on CPU.
    """

    def __init__(self, variants: Sequence[Variant], lrs: Sequence[float], feature_dim: int,
                 n_classes: int, total_steps: int, momentum: float = 0.9,
                 weight_decay: float = 0.0, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        g = torch.Generator().manual_seed(seed)  # on the CPU: the same heads on every device
        self.device = torch.device(device)
        self.variants = list(variants)
        self.lrs = torch.tensor(list(lrs), dtype=torch.float32, device=self.device)
        self.total_steps, self.momentum, self.weight_decay = total_steps, momentum, weight_decay
        self.n_classes = n_classes
        n = len(self.lrs)
        # DINOv2: weight ~ N(0, 0.01), bias 0
        self.weight = {v: (torch.randn(n, n_classes, v.dim(feature_dim), generator=g) * 0.01
                           ).to(self.device) for v in self.variants}
        self.bias = {v: torch.zeros(n, n_classes, device=self.device) for v in self.variants}
        self.buffers = {id(p): torch.zeros_like(p) for v in self.variants
                        for p in (self.weight[v], self.bias[v])}
        self.step_count = 0

    def step_flops(self, batch_size: int) -> float:
        """Multiply-adds x 2 of one training step (forward and weight gradient of every head)."""
        return 4.0 * batch_size * len(self.lrs) * sum(
            w.shape[1] * w.shape[2] for w in self.weight.values())

    def lr_factor(self) -> float:
        """Cosine decay from 1 to 0 over ``total_steps`` (torch's CosineAnnealingLR, eta_min 0)."""
        return 0.5 * (1.0 + math.cos(math.pi * min(self.step_count, self.total_steps)
                                     / max(self.total_steps, 1)))

    def inputs(self, feats: dict[str, Tensor]) -> list[Tensor]:
        """Each variant's (n, dim) inputs, to pass to :meth:`step` for a whole epoch."""
        return [v.inputs(feats) for v in self.variants]

    def logits(self, variant: Variant, x: Tensor) -> Tensor:
        """(L, B, C) scores of every head of ``variant`` for inputs ``x`` (B, dim)."""
        return torch.einsum("bd,lcd->lbc", x, self.weight[variant]) + self.bias[variant][:, None]

    @torch.no_grad()
    def step(self, inputs: list[Tensor], labels: Tensor, index: Tensor) -> Tensor:
        """One SGD step of every head on the samples ``index`` of ``inputs`` (from
        :meth:`inputs`); returns the (V, L) mean cross-entropies of the batch."""
        factor = self.lr_factor()
        y = labels[index].to(self.device, non_blocking=True)
        rows = torch.arange(len(index), device=self.device)
        lr = self.lrs * factor
        losses = []
        for v, x_all in zip(self.variants, inputs):
            x = x_all[index].to(self.device, non_blocking=True)
            logits = self.logits(v, x)
            lse = logits.logsumexp(dim=-1)  # (L, B)
            losses.append((lse - logits[:, rows, y]).mean(dim=1))
            # d(mean cross-entropy)/d(logits) = (softmax - onehot) / B
            grad_logits = (logits - lse[..., None]).exp_()
            grad_logits[:, rows, y] -= 1.0
            grad_logits /= len(index)
            grads = (torch.einsum("lbc,bd->lcd", grad_logits, x), grad_logits.sum(dim=1))
            for p, grad in zip((self.weight[v], self.bias[v]), grads):
                if self.weight_decay:
                    grad = grad + self.weight_decay * p
                buf = self.buffers[id(p)].mul_(self.momentum).add_(grad)  # torch SGD, dampening 0
                p.sub_(lr.view(-1, *([1] * (p.dim() - 1))) * buf)
        self.step_count += 1
        return torch.stack(losses)

    @torch.no_grad()
    def accuracy(self, feats: dict[str, Tensor], labels: Tensor, chunk: int = 4096
                 ) -> dict[str, Tensor]:
        """``{"top1", "top5", "loss"}``, each (V, L): accuracy and mean cross-entropy of every
        head on ``feats``/``labels``."""
        k = min(5, self.n_classes)
        top1 = torch.zeros(len(self.variants), len(self.lrs), device=self.device)
        top5, loss = torch.zeros_like(top1), torch.zeros_like(top1)
        for start in range(0, len(labels), chunk):
            index = torch.arange(start, min(start + chunk, len(labels)))
            y = labels[index].to(self.device)
            for i, v in enumerate(self.variants):
                logits = self.logits(v, v.inputs(feats, index).to(self.device))
                ranked = logits.topk(k, dim=-1).indices
                top1[i] += (ranked[..., 0] == y).sum(dim=1).float()
                top5[i] += (ranked == y[:, None]).any(dim=-1).sum(dim=1).float()
                loss[i] += F.cross_entropy(logits.flatten(0, 1), y.repeat(len(self.lrs)),
                                           reduction="none").view(len(self.lrs), -1).sum(dim=1)
        n = max(len(labels), 1)
        return {"top1": top1.cpu() / n, "top5": top5.cpu() / n, "loss": loss.cpu() / n}


# below about this many flops per step, threads cost more in synchronisation than they save
FLOPS_PER_THREAD = 1e9


@contextmanager
def step_threads(flops_per_step: float) -> Iterator[int]:
    """Limit torch's intra-op threads to one per ``FLOPS_PER_THREAD`` of work per step (at
    least one, at most the current count) and restore the count afterwards. A grid of small
    heads (MNIST: 0.3 GFLOP a step) ran 7x slower on 2 threads than on 1 on a shared, loaded
    2-core machine: the threads wait on each other at every one of the many tiny ops."""
    before = torch.get_num_threads()
    threads = max(1, min(before, int(flops_per_step // FLOPS_PER_THREAD) + 1))
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def minibatches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless shuffled mini-batches of ``range(n)`` (a fresh permutation per pass; the last,
    short batch of a pass is kept)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g)
        yield from order.split(batch_size)


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(kept, held-out) indices: ``fraction`` of each class held out (at least one sample of any
    class with two or more), chosen with a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = min(max(round(fraction * len(idx)), 1), len(idx) - 1) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values
