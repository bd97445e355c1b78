"""k-nearest-neighbour search on L2-normalised embeddings with FAISS (inner product = cosine).

Exact ``IndexFlatIP`` for small N; ``IndexIVFFlat`` (exact scores for the probed lists) for
medium N; ``IndexIVFPQ`` whose candidates are re-ranked by the exact dot product for large N.
Indexes go to every visible GPU through ``faiss.index_cpu_to_all_gpus`` when faiss has GPUs.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np
from tqdm import tqdm

from curation.config import IndexConfig
from dinosys.errors import UserError

log = logging.getLogger(__name__)


def choose_kind(n: int, cfg: IndexConfig) -> str:
    """The index kind for ``n`` database vectors."""
    if cfg.kind != "auto":
        return cfg.kind
    if n <= cfg.flat_max:
        return "flat"
    return "ivfpq" if n >= cfg.ivfpq_min else "ivf"


def default_nlist(n: int) -> int:
    """About 2*sqrt(N) inverted lists (fewer lists keep the coarse quantiser cheap on CPU),
    with at least ~39 training points per list."""
    return int(max(1, min(2 * math.sqrt(n), n // 39)))


def gpu_enabled(cfg: IndexConfig) -> bool:
    """True when faiss is a GPU build that sees devices and the config allows them."""
    return bool(cfg.use_gpu and hasattr(faiss, "index_cpu_to_all_gpus")
                and hasattr(faiss, "GpuParameterSpace") and faiss.get_num_gpus() > 0)


def _to_gpu(index: faiss.Index, cfg: IndexConfig) -> faiss.Index:
    if gpu_enabled(cfg):
        log.info("faiss: index on %d GPU(s)", faiss.get_num_gpus())
        return faiss.index_cpu_to_all_gpus(index)
    return index


def build_index(xb: np.ndarray, cfg: IndexConfig, kind: str | None = None,
                seed: int = 0) -> faiss.Index:
    """Train (if needed) and fill an inner-product index over ``xb`` (float32, C-contiguous)."""
    n, d = xb.shape
    kind = kind or choose_kind(n, cfg)
    if kind == "flat":
        return _filled(faiss.IndexFlatIP(d), xb, cfg)
    nlist = min(cfg.nlist or default_nlist(n), n)
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        if d % cfg.pq_m:
            raise UserError(f"config key 'index.pq_m': {cfg.pq_m} must divide the embedding "
                            f"dimension {d}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    n_train = min(n, max(cfg.train_size, 39 * nlist))
    sample = xb if n_train == n else xb[np.sort(rng.choice(n, n_train, replace=False))]
    index = _to_gpu(index, cfg)
    log.info("faiss: training %s (nlist %d) on %d vectors", kind, nlist, len(sample))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    _add_batched(index, xb, cfg)
    space = faiss.GpuParameterSpace() if gpu_enabled(cfg) else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", min(cfg.nprobe, nlist))
    return index


def _filled(index: faiss.Index, xb: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    index = _to_gpu(index, cfg)
    _add_batched(index, xb, cfg)
    return index


def _add_batched(index: faiss.Index, xb: np.ndarray, cfg: IndexConfig) -> None:
    for lo in range(0, len(xb), cfg.query_batch * 4):
        index.add(np.ascontiguousarray(xb[lo: lo + cfg.query_batch * 4], dtype=np.float32))


def exact_rerank(xq: np.ndarray, xb: np.ndarray, cand: np.ndarray, k: int,
                 block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate ids ``cand`` (nq, c) by the exact dot product; keep the best ``k``."""
    nq = len(xq)
    sims = np.full((nq, k), -np.inf, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    for lo in range(0, nq, block):
        c = cand[lo: lo + block]
        q = np.asarray(xq[lo: lo + block], dtype=np.float32)
        valid = c >= 0
        vecs = np.asarray(xb[np.where(valid, c, 0)], dtype=np.float32)  # (b, c, d)
        s = np.matmul(vecs, q[:, :, None])[:, :, 0]
        s[~valid] = -np.inf
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        sims[lo: lo + block, : top.shape[1]] = np.take_along_axis(s, top, 1)
        ids[lo: lo + block, : top.shape[1]] = np.where(np.take_along_axis(valid, top, 1),
                                                       np.take_along_axis(c, top, 1), -1)
    return sims, ids


def knn(xb: np.ndarray, k: int, cfg: IndexConfig, xq: np.ndarray | None = None,
        progress: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database rows of each query (default: the database itself).

    Returns ``(sims, ids)`` of shape (nq, k), best first; scores are exact dot products
    (IVF-PQ candidates are re-ranked), missing neighbours have id -1 and score -inf.
    """
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    queries = xb if xq is None else np.ascontiguousarray(xq, dtype=np.float32)
    k_eff = min(k, len(xb))
    kind = choose_kind(len(xb), cfg)
    index = build_index(xb, cfg, kind, seed)
    k_search = min(max(k_eff, cfg.rerank_k), len(xb)) if kind == "ivfpq" else k_eff
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for lo in tqdm(range(0, len(queries), cfg.query_batch), desc=f"knn ({kind})", unit="batch",
                   disable=not progress, leave=False):
        q = queries[lo: lo + cfg.query_batch]
        d, i = index.search(q, k_search)
        if kind == "ivfpq":
            d, i = exact_rerank(q, xb, i, k_eff)
        d = np.where(i >= 0, d, -np.inf)
        sims[lo: lo + len(q), :k_eff] = d[:, :k_eff]
        ids[lo: lo + len(q), :k_eff] = i[:, :k_eff]
    return sims, ids
