"""The k-NN graph of a pool too large for one process: one shared index, searched in slices.

The index is trained once and written once (:func:`build`), then every part loads it read-only
and searches its slice of queries (:func:`search_slice`), holding only a block of queries, its
heaps and one inverted list at a time: embeddings are read from the ``.npy`` file block by
block (a fresh memory map per block, so touched pages do not pile up in the process).

Index kinds (``curation.knn.choose_kind``): ``flat`` (small pools: each part builds an exact
``IndexFlatIP`` over the pool, nothing to share); ``ivf`` on CPU: centroids, and the pool
re-ordered by inverted list in ``list_vectors.npy`` (fp16) with ``list_rows.npy`` and
``list_starts.npy``, searched list-wise (``curation.knn.search_lists``) with the vectors read
by ``pread``; ``ivfpq``, or ``ivf`` when faiss sees GPUs: a faiss index file (``index.faiss``)
that each part reads (memory-mapped on CPU) and copies to every GPU of its node; IVF-PQ
candidates are re-ranked by exact dot products.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from curation import knn as knn_mod
from curation.config import IndexConfig
from curation.store import NpyWriter, load_npy, save_json, save_npy
from dinosys.errors import UserError

log = logging.getLogger(__name__)

ROW_BLOCK = 65_536


class RowReader:
    """Rows of an ``(N, d)`` ``.npy`` file (fp16 or fp32) read as float32 a block at a time."""

    def __init__(self, path: Path, rows: np.ndarray | None = None) -> None:
        self.path = Path(path)
        head = load_npy(self.path, mmap=True)
        self.dim = int(head.shape[1])
        self.dtype = head.dtype
        self.offset = int(head.offset)
        self.rows = np.arange(len(head), dtype=np.int64) if rows is None else rows
        del head

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Float32 rows ``lo:hi`` of the selection (through a memory map dropped afterwards)."""
        emb = load_npy(self.path, mmap=True)
        sel = self.rows[lo:hi]
        out = np.empty((len(sel), self.dim), dtype=np.float32)
        for b in range(0, len(sel), ROW_BLOCK):
            part = sel[b: b + ROW_BLOCK]
            if len(part) and part[-1] - part[0] == len(part) - 1:  # contiguous: one slice
                out[b: b + len(part)] = emb[part[0]: part[-1] + 1]
            else:
                out[b: b + len(part)] = emb[part]
        del emb
        return out

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Float32 rows at selection positions ``idx`` (any order), read with ``pread`` (runs
        of consecutive rows in one call). A memory map would not do: on a random gather the
        kernel maps the cached neighbours of every touched page too, pulling most of the file
        into the resident set."""
        rows = np.asarray(self.rows[idx], dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        starts = np.flatnonzero(np.diff(srt, prepend=srt[0] - 2) != 1)  # run starts
        ends = np.append(starts[1:], len(srt))
        size = self.dim * self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            pos = 0
            for s0, e0 in zip(starts.tolist(), ends.tolist()):
                first, count = int(srt[s0]), e0 - s0
                buf = os.pread(fd, count * size, self.offset + first * size)
                block = np.frombuffer(buf, dtype=self.dtype).reshape(count, self.dim)
                out[order[pos: pos + count]] = block
                pos += count
        finally:
            os.close(fd)
        dup = srt[1:] == srt[:-1]  # repeated rows: copy from their first occurrence
        if dup.any():
            first_of = np.maximum.accumulate(np.where(np.append(True, ~dup),
                                                      np.arange(len(srt)), 0))
            out[order[1:][dup]] = out[order[first_of[1:][dup]]]
        return out


@dataclass
class SharedIndex:
    """A built index directory, opened read-only."""

    dir: Path
    kind: str
    id: str
    n: int
    nprobe: int


def _train_sample(reader: RowReader, nlist: int, cfg: IndexConfig, seed: int) -> np.ndarray:
    """``max(train_size, 39 * nlist)`` rows drawn without replacement (as ``knn._train``)."""
    n = len(reader)
    n_train = min(n, max(cfg.train_size, 39 * nlist))
    if n_train == n:
        return reader.read(0, n)
    rng = np.random.default_rng(seed)
    return reader.take(np.sort(rng.choice(n, n_train, replace=False)))


def build(reader: RowReader, cfg: IndexConfig, out: Path, seed: int = 0) -> SharedIndex:
    """Train and fill the index over the selected rows into ``out`` (each file atomic,
    ``INDEX.json`` last)."""
    n, d = len(reader), reader.dim
    kind = knn_mod.choose_kind(n, cfg)
    gpu = knn_mod.gpu_enabled(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out
    nlist = knn_mod._nlist(n, cfg) if kind != "flat" else 0
    if kind == "ivf" and not gpu:
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        log.info("index: training %d lists on %d vectors", nlist, min(n, max(cfg.train_size,
                                                                               39 * nlist)))
        ivf.train(_train_sample(reader, nlist, cfg, seed))
        centroids = quantizer.reconstruct_n(0, nlist)
        home = np.empty(n, dtype=np.int64)
        for lo in range(0, n, cfg.query_batch):
            home[lo: lo + cfg.query_batch] = quantizer.search(
                reader.read(lo, lo + cfg.query_batch), 1)[1][:, 0]
        order = np.argsort(home, kind="stable")
        starts = np.zeros(nlist + 1, dtype=np.int64)
        np.cumsum(np.bincount(home, minlength=nlist), out=starts[1:])
        del home
        vec = NpyWriter(tmp / "list_vectors.npy", (n, d), np.float16)
        for lo in range(0, n, ROW_BLOCK):
            vec.write(reader.take(order[lo: lo + ROW_BLOCK]))
        vec.close()
        save_npy(tmp / "centroids.npy", centroids)
        save_npy(tmp / "list_rows.npy", order)
        save_npy(tmp / "list_starts.npy", starts)
    elif kind != "flat":
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if d % cfg.pq_m:
                raise UserError(f"config key 'index.pq_m': {cfg.pq_m} must divide the "
                                f"embedding dimension {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.pq_m, 8,
                                     faiss.METRIC_INNER_PRODUCT)
        index.train(_train_sample(reader, nlist, cfg, seed))
        for lo in range(0, n, cfg.query_batch):
            index.add(reader.read(lo, lo + cfg.query_batch))
        faiss.write_index(index, str(tmp / ".index.faiss.tmp"))
        os.replace(tmp / ".index.faiss.tmp", tmp / "index.faiss")
    meta = {"kind": kind, "id": uuid.uuid4().hex[:16], "n": n, "dim": d, "nlist": nlist,
            "nprobe": min(cfg.nprobe, nlist) if nlist else 0}
    save_json(tmp / "INDEX.json", meta)
    return open_index(out)


def open_index(path: Path) -> SharedIndex:
    """A built index (UserError when it is not complete)."""
    try:
        meta = json.loads((path / "INDEX.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"no complete k-NN index in {path}; run the dedup parts again") from None
    return SharedIndex(path, meta["kind"], meta["id"], meta["n"], meta["nprobe"])


class FileLists:
    """The inverted lists of a shared ``ivf`` index, vectors read with ``pread`` (no mapping:
    the part's resident memory stays its own buffers whatever the index size)."""

    def __init__(self, index: SharedIndex) -> None:
        self.rows = load_npy(index.dir / "list_rows.npy", mmap=True)
        self.starts = load_npy(index.dir / "list_starts.npy")
        self.nlist = len(self.starts) - 1
        head = load_npy(index.dir / "list_vectors.npy", mmap=True)
        self.dim = int(head.shape[1])
        self.offset = int(head.offset)
        del head
        self.fd = os.open(index.dir / "list_vectors.npy", os.O_RDONLY)

    def close(self) -> None:
        """Close the vector file."""
        os.close(self.fd)

    def members(self, lst: int) -> np.ndarray:
        """Pool positions of list ``lst``."""
        return np.asarray(self.rows[self.starts[lst]: self.starts[lst + 1]])

    def vectors(self, lst: int, c0: int, c1: int) -> torch.Tensor:
        """float32 vectors of members ``c0:c1`` of list ``lst``."""
        row = int(self.starts[lst]) + c0
        nbytes = (c1 - c0) * self.dim * 2
        buf = os.pread(self.fd, nbytes, self.offset + row * self.dim * 2)
        vec = np.frombuffer(buf, dtype=np.float16).reshape(c1 - c0, self.dim)
        return torch.from_numpy(vec.astype(np.float32))


def _padded(d: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = np.full((len(d), k), -np.inf, dtype=np.float32)
    ids = np.full((len(d), k), -1, dtype=np.int64)
    kk = min(k, d.shape[1])
    sims[:, :kk] = np.where(i[:, :kk] >= 0, d[:, :kk], -np.inf)
    ids[:, :kk] = i[:, :kk]
    return sims, ids


def search_slice(reader: RowReader, index: SharedIndex, lo: int, hi: int, k: int,
                 cfg: IndexConfig, block: int, progress: bool = False
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """The ``k`` nearest pool positions of the queries ``lo:hi`` of ``reader`` (a self-join over
    the pool the index holds), ``block`` queries at a time: yields ``(first query, query
    vectors, sims, ids)`` per block, best first, -inf / -1 where fewer were found."""
    k_eff = min(k, index.n)
    if index.kind == "flat":
        flat = faiss.IndexFlatIP(reader.dim)
        for b in range(0, index.n, ROW_BLOCK):
            flat.add(reader.read(b, min(index.n, b + ROW_BLOCK)))
        flat = knn_mod._to_gpu(flat, cfg)
        for b in range(lo, hi, block):
            q = reader.read(b, min(hi, b + block))
            yield (b, q, *_padded(*flat.search(q, k_eff), k))
        return
    if (index.dir / "index.faiss").is_file():
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if not knn_mod.gpu_enabled(cfg) else 0
        fidx = knn_mod._to_gpu(faiss.read_index(str(index.dir / "index.faiss"), flags), cfg)
        space = faiss.GpuParameterSpace() if knn_mod.gpu_enabled(cfg) else faiss.ParameterSpace()
        space.set_index_parameter(fidx, "nprobe", index.nprobe)
        k_search = min(max(k_eff, cfg.rerank_k), index.n) if index.kind == "ivfpq" else k_eff
        for b in range(lo, hi, block):
            q = reader.read(b, min(hi, b + block))
            d, i = fidx.search(q, k_search)
            if index.kind == "ivfpq":
                d, i = _rerank(reader, q, i, k_eff)
            yield (b, q, *_padded(d, i, k))
        return
    quantizer = faiss.IndexFlatIP(reader.dim)
    quantizer.add(load_npy(index.dir / "centroids.npy"))
    lists = FileLists(index)
    try:
        for b in range(lo, hi, block):
            q = reader.read(b, min(hi, b + block))
            probes = knn_mod.route(quantizer, q, index.nprobe, cfg.query_batch)
            yield (b, q, *_padded(*knn_mod.search_lists(q, probes, lists, k_eff, progress), k))
    finally:
        lists.close()


def _rerank(reader: RowReader, q: np.ndarray, cand: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-scoring of IVF-PQ candidates, their vectors read from the embedding file."""
    uniq, inverse = np.unique(np.where(cand >= 0, cand, 0), return_inverse=True)
    vecs = reader.take(uniq)
    sims, pos = knn_mod.exact_rerank(q, vecs, np.where(cand >= 0, inverse.reshape(cand.shape), -1),
                                     k)
    return sims, np.where(pos >= 0, uniq[np.maximum(pos, 0)], -1)
