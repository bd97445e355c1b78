"""k-means: a faiss backend, and a torch.distributed backend for data spread over ranks.

The torch backend keeps each rank's rows where they are, assigns them chunk by chunk (bounded
memory: ``chunk_size x k`` scores at a time), accumulates per-cluster sums with ``index_add_``
and all-reduces sums and counts. Seeding is k-means++ on a sample drawn by *global* row index,
so the result does not depend on how rows are split over ranks. Works on CPU (gloo) and CUDA.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def kmeans_faiss(x: np.ndarray, k: int, n_iter: int = 20, seed: int = 0,
                 init: np.ndarray | None = None, use_gpu: bool = True) -> np.ndarray:
    """Centroids (k, d) of ``x`` with ``faiss.Kmeans`` (all points used, no subsampling)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = min(k, len(x))
    gpu = bool(use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0)
    km = faiss.Kmeans(x.shape[1], k, niter=n_iter, seed=seed, gpu=gpu, verbose=False,
                      max_points_per_centroid=max(256, -(-len(x) // k)), min_points_per_centroid=1)
    km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, np.float32))
    return km.centroids.copy()


def assign(x: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor,
           chunk_size: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of each row and the squared distance, computed chunk by chunk."""
    c = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
    labels, dists = _assign_torch(torch.as_tensor(np.asarray(x)), c, chunk_size)
    return labels.numpy(), dists.numpy()


# CPU scores per matrix product (rows x k floats): small enough to stay in cache, large enough
# for an efficient GEMM; about 1.7x faster than one chunk_size x k product on 256-d data
_CPU_SCORE_BLOCK = 1 << 22


def _assign_torch(x: torch.Tensor, c: torch.Tensor, chunk_size: int,
                  sums: torch.Tensor | None = None,
                  counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row as argmax of ``x.c - |c|^2/2`` (= argmin of ``|x - c|^2``),
    its squared distance, and optionally the per-cluster row sums and counts (``index_add_``).

    Rows move to the centroids' device ``chunk_size`` at a time. On CPU, blocks of about
    ``_CPU_SCORE_BLOCK`` scores are spread over one Python thread per torch thread, each running
    single-threaded torch with its own partial sums: many short parallel regions (one per
    block) slowed k-means 2-3x whenever another process held a core.
    """
    c = c.float()
    neg_half_norm = -0.5 * (c * c).sum(1)
    labels = torch.empty(len(x), dtype=torch.long, device=x.device)
    dists = torch.empty(len(x), dtype=torch.float32, device=x.device)
    if c.device.type != "cpu":
        _assign_blocks(x, c, neg_half_norm, range(0, len(x), chunk_size), chunk_size, labels,
                       dists, sums, counts)
        return labels, dists
    block = max(1, min(chunk_size, _CPU_SCORE_BLOCK // max(1, len(c))))
    starts = range(0, len(x), block)
    workers = min(torch.get_num_threads(), len(starts))
    if workers <= 1:
        _assign_blocks(x, c, neg_half_norm, starts, block, labels, dists, sums, counts)
        return labels, dists
    with_stats = sums is not None and counts is not None
    partial = [(torch.zeros_like(sums), torch.zeros_like(counts)) if with_stats else (None, None)
               for _ in range(workers)]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda w: _assign_blocks(x, c, neg_half_norm, starts[w::workers], block,
                                                   labels, dists, *partial[w]), range(workers)))
    finally:
        torch.set_num_threads(torch_threads)
    if with_stats:
        for part_sums, part_counts in partial:  # fixed order: deterministic for a thread count
            sums += part_sums
            counts += part_counts
    return labels, dists


def _assign_blocks(x: torch.Tensor, c: torch.Tensor, neg_half_norm: torch.Tensor,
                   starts: range, block: int, labels: torch.Tensor, dists: torch.Tensor,
                   sums: torch.Tensor | None, counts: torch.Tensor | None) -> None:
    """:func:`_assign_torch` for the row blocks starting at ``starts`` (``addmm`` into one
    reused score buffer); writes their labels and distances, adds to ``sums``/``counts``."""
    n_max = min(block, max(1, len(x)))
    scores = torch.empty(n_max, len(c), dtype=torch.float32, device=c.device)
    best = torch.empty(n_max, dtype=torch.float32, device=c.device)
    idx = torch.empty(n_max, dtype=torch.long, device=c.device)
    for lo in starts:
        xb = x[lo: lo + block].to(c.device).float()
        nb = len(xb)
        s, b, i = scores[:nb], best[:nb], idx[:nb]
        torch.addmm(neg_half_norm, xb, c.T, out=s)
        torch.max(s, dim=1, out=(b, i))
        labels[lo: lo + nb] = i.to(labels.device)
        dists[lo: lo + nb] = ((xb * xb).sum(1) - 2 * b).clamp_min(0).to(dists.device)
        if sums is not None and counts is not None:
            sums.index_add_(0, i, xb)
            counts.index_add_(0, i, torch.ones(nb, dtype=counts.dtype, device=c.device))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


def _global_sample(x: torch.Tensor, n_sample: int, seed: int, device: torch.device) -> torch.Tensor:
    """The same sample of rows on every rank, chosen by global row index."""
    rank, world = _world()
    counts = torch.zeros(world, dtype=torch.long, device=device)
    counts[rank] = len(x)
    _all_reduce(counts)
    total = int(counts.sum())
    offset = int(counts[:rank].sum())
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=gen)[: min(n_sample, total)].sort().values
    mine = chosen[(chosen >= offset) & (chosen < offset + len(x))] - offset
    local = torch.zeros(len(chosen), x.shape[1], dtype=torch.float32, device=device)
    pos = torch.searchsorted(chosen, mine + offset)
    local[pos.to(device)] = x[mine.to(x.device)].to(device).float()
    return _all_reduce(local)  # rows are disjoint across ranks: the sum assembles the sample


def kmeans_plusplus(sample: torch.Tensor, k: int, seed: int, rounds: int = 100) -> torch.Tensor:
    """D^2 (k-means++) seeding on ``sample``, deterministic for a seed.

    For ``k <= rounds`` this is exact k-means++; above, each round draws ``k / rounds`` centres
    from the same D^2 distribution (the k-means|| idea), so distances are updated with one
    matrix product per round instead of ``k`` passes over the sample.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(sample)
    sample = sample.float()
    sq = (sample * sample).sum(1)
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = (sq - 2 * sample @ sample[chosen[0]] + sq[chosen[0]]).clamp_min(0)
    per_round = max(1, -(-(k - 1) // rounds))
    while len(chosen) < k:
        m = min(per_round, k - len(chosen))
        probs = d2.double().cpu()
        if float(probs.sum()) <= 0:
            new = torch.randint(n, (m,), generator=gen)
        else:
            new = torch.multinomial(probs, m, replacement=False, generator=gen)
        new = new.to(sample.device)
        chosen.extend(new.tolist())
        c = sample[new]
        # min_j |x - c_j|^2 = |x|^2 + min_j (|c_j|^2 - 2 x.c_j): one addmm, no sample-sized copy
        dn = torch.addmm((c * c).sum(1)[None, :], sample, c.T, alpha=-2)
        d2 = torch.minimum(d2, (dn.min(dim=1).values + sq).clamp_min(0))
    return sample[torch.tensor(chosen[:k], device=sample.device)].clone()


def kmeans_torch(x: np.ndarray | torch.Tensor, k: int, n_iter: int = 20, seed: int = 0,
                 chunk_size: int = 65_536, sample_per_centroid: int = 16,
                 init: torch.Tensor | np.ndarray | None = None,
                 device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd k-means over rows spread across ranks (``torch.distributed`` when initialised).

    ``x`` is this rank's shard (any float dtype; kept where it is and converted chunk by chunk).
    Returns ``(centroids (k, d) float32, this rank's labels)``; every rank gets the same
    centroids. Empty clusters are re-seeded by splitting the largest cluster.
    """
    x = torch.as_tensor(x)
    if device is None:
        device = "cuda" if torch.cuda.is_available() and dist_backend_ok() else "cpu"
    device = torch.device(device)
    total = int(_all_reduce(torch.tensor([len(x)], dtype=torch.long, device=device)).item())
    k = min(k, total)
    if init is not None:
        centroids = torch.as_tensor(np.asarray(init), dtype=torch.float32, device=device).clone()
    else:
        sample = _global_sample(x, max(k * sample_per_centroid, k), seed, device)
        centroids = kmeans_plusplus(sample, k, seed)
    d = x.shape[1]
    labels = torch.empty(0)
    for it in range(n_iter):
        sums = torch.zeros(k, d, dtype=torch.float32, device=device)
        counts = torch.zeros(k, dtype=torch.float32, device=device)
        labels, dists = _assign_torch(x, centroids, chunk_size, sums, counts)
        stats = torch.cat([sums, counts[:, None], dists.sum().reshape(1, 1).expand(k, 1)], 1)
        _all_reduce(stats)
        sums, counts = stats[:, :d], stats[:, d]
        inertia = float(stats[0, d + 1])
        new = sums / counts.clamp_min(1)[:, None]
        empty = counts == 0
        if empty.any():
            new = _split_largest(new, counts, empty, seed + it)
        centroids = new
        log.debug("kmeans iter %d inertia %.6g (%d empty)", it, inertia, int(empty.sum()))
    labels, _ = _assign_torch(x, centroids, chunk_size)
    return centroids.cpu().numpy(), labels.cpu().numpy()


def _split_largest(c: torch.Tensor, counts: torch.Tensor, empty: torch.Tensor,
                   seed: int) -> torch.Tensor:
    """faiss-style: each empty centroid becomes a perturbed copy of a large cluster's centroid."""
    gen = torch.Generator().manual_seed(seed)
    c = c.clone()
    counts = counts.clone()
    for j in torch.nonzero(empty).flatten().tolist():
        big = int(torch.argmax(counts))
        eps = 1e-3 * (torch.rand(c.shape[1], generator=gen).to(c.device) - 0.5)
        c[j] = c[big] * (1 + eps)
        c[big] = c[big] * (1 - eps)
        counts[j] = counts[big] / 2
        counts[big] = counts[big] / 2
    return c


def dist_backend_ok() -> bool:
    """CUDA tensors need an NCCL (not gloo) group when distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_backend() != "gloo"


def inertia(x: np.ndarray, centroids: np.ndarray, chunk_size: int = 65_536) -> float:
    """Mean squared distance of the rows to their nearest centroid."""
    _, d2 = assign(x, centroids, chunk_size)
    return float(d2.mean())
