"""The dedup stage split over parts: kNN graph by query slices, verification by candidate
blocks, then one merge (copy groups, decontamination).

``dedup --part i/n``: part ``i`` searches pool positions ``[i*N/n, (i+1)*N/n)`` against the
shared index (``knn/index-<digest>/``, built by whichever part comes first, then read-only) and
writes the edges of its queries above the lowest threshold in use, plus each query's nearest
evaluation image. The kNN merge (``knn/``) dedupes the edges of all parts into one sorted edge
list (block by block on disk above ``dedup.spill_edges``). ``verify --part i/n`` verifies the
candidate blocks ``b % n == i``. The dedup merge turns the edges into copy groups (connected
components, on blocks of the memory-mapped edge list when large) and decontaminates.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import dedup as dd
from curation import verify
from curation.config import CurationConfig, IndexConfig
from curation.ingest import read_item_bytes
from curation.knn import knn
from curation.parts import (
    Part,
    check_parts,
    complete_split,
    cpu_seconds,
    merge_once,
    parts_dir,
    peak_rss_gib,
    split_stage,
)
from curation.shared_index import RowReader, build, open_index, search_slice
from curation.store import (
    NpyWriter,
    Stage,
    digest,
    load_npy,
    load_table,
    save_json,
    save_npy,
    save_table,
)
from curation.work import dedup_embed_stage, embed_stages, items, need, work_dir
from dinosys.config import to_dict
from dinosys.errors import UserError

log = logging.getLogger(__name__)


def _low(cfg: CurationConfig) -> float:
    return min([cfg.dedup.threshold, cfg.dedup.decontam_threshold, *cfg.dedup.sweep])


def knn_key(cfg: CurationConfig) -> str:
    """Digest of the kNN graph: the embeddings, k, the lowest threshold, the index config."""
    src = dedup_embed_stage(cfg)
    index = {k: v for k, v in to_dict(cfg.index).items() if k not in ("part_block",)}
    return digest("knn", need(Stage(work_dir(cfg), src), "embed"), cfg.dedup.k, _low(cfg),
                  index, cfg.seed)


def dedup_key(cfg: CurationConfig) -> str:
    """Digest of the dedup result: the kNN graph and the dedup config."""
    return digest("dedup", knn_key(cfg), to_dict(cfg.dedup))


def role_positions(cfg: CurationConfig, role: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, embedding rows) of the decoded images with ``role`` in the dedup embedding,
    read from the item table's id/role/status columns only."""
    work = work_dir(cfg)
    t = pq.read_table(work / "ingest" / "items.parquet", columns=["id", "role", "status"])
    mask = pc.and_(pc.equal(t["role"], role), pc.equal(t["status"], "ok"))
    role_ids = t["id"].filter(mask).to_numpy()
    ids = load_npy(work / dedup_embed_stage(cfg) / "ids.npy", mmap=True)
    rows = np.searchsorted(ids, role_ids)
    found = (rows < len(ids)) & (np.asarray(ids[np.minimum(rows, len(ids) - 1)]) == role_ids)
    return role_ids[found], rows[found]


def _reader(cfg: CurationConfig, rows: np.ndarray) -> RowReader:
    return RowReader(work_dir(cfg) / dedup_embed_stage(cfg) / "embeddings.npy", rows)


def _index(cfg: CurationConfig, key: str, reader: RowReader):
    """The shared index: built once (the first part to get here), then opened read-only."""
    stage = Stage(work_dir(cfg) / "knn", f"index-{key}")

    def make() -> dict:
        t0, c0 = time.time(), cpu_seconds()
        idx = build(reader, cfg.index, stage.dir, cfg.seed)
        summary = {"kind": idx.kind, "id": idx.id, "seconds": round(time.time() - t0, 2),
                   "cpu_seconds": round(cpu_seconds() - c0, 2),
                   "peak_rss_gib": round(peak_rss_gib(), 3)}
        stage.mark_done(key, summary)
        return summary

    merge_once(stage, key, make)
    return open_index(stage.dir)


def _knn_part(cfg: CurationConfig, key: str, i: int, n: int) -> dict:
    stage = Stage(work_dir(cfg), "knn")
    _, pool_rows = role_positions(cfg, "pool")
    reader = _reader(cfg, pool_rows)
    index = _index(cfg, key, reader)
    part = Part(stage, i, n)
    lo, hi = i * len(pool_rows) // n, (i + 1) * len(pool_rows) // n
    eval_ids, eval_rows = role_positions(cfg, "eval")
    ev = _reader(cfg, eval_rows).read(0, len(eval_rows)) if len(eval_rows) else None
    low = _low(cfg)
    out_i, out_j, out_s = [], [], []
    c0 = cpu_seconds()
    eval_sim = np.full(hi - lo, -np.inf, dtype=np.float32)
    eval_id = np.full(hi - lo, -1, dtype=np.int64)
    t0 = time.time()
    for b, q, sims, nbrs in search_slice(reader, index, lo, hi, cfg.dedup.k, cfg.index,
                                         cfg.index.part_block, cfg.progress):
        e = dd.knn_edges(sims, nbrs, low, offset=b)
        out_i.append(e.i)
        out_j.append(e.j)
        out_s.append(e.sim)
        if ev is not None:
            flat = IndexConfig(kind="flat", use_gpu=cfg.index.use_gpu)
            s, j = knn(ev, 1, flat, xq=q)
            eval_sim[b - lo: b - lo + len(q)] = s[:, 0]
            eval_id[b - lo: b - lo + len(q)] = j[:, 0]
    edges = dd.unique_edges(*(np.concatenate(a) if a else np.zeros(0, t)
                              for a, t in ((out_i, np.int64), (out_j, np.int64),
                                           (out_s, np.float32))))
    for name, arr in (("i", edges.i), ("j", edges.j), ("sim", edges.sim),
                      ("eval_sim", eval_sim), ("eval_id", eval_id)):
        save_npy(part.file(f"{name}.npy"), arr)
    return {"queries": hi - lo, "edges": len(edges), "index": index.kind,
            "search_seconds": round(time.time() - t0, 2),
            "search_cpu_seconds": round(cpu_seconds() - c0, 2)}


def _write_npy_stream(path, dtype, blocks: list) -> int:
    """Write the 1-d arrays ``blocks`` (loaded one at a time) as one ``.npy``; its length."""
    arrays = list(blocks)
    n = sum(int(load_npy(p, mmap=True).shape[0]) if isinstance(p, Path) else len(p)
            for p in arrays)
    out = NpyWriter(path, (n,), dtype)
    for p in arrays:
        out.write(load_npy(p) if isinstance(p, Path) else p)
    out.close()
    return n


def _merge_edges(cfg: CurationConfig, n: int, n_pool: int, out) -> int:
    """The edges of all parts, each pair once, sorted, into ``out/edges_{i,j,sim}.npy``: by
    ranges of ``i`` (each part's edges are sorted by ``i``), so memory is one range."""
    stage = Stage(work_dir(cfg), "knn")
    parts = [Part(stage, p, n) for p in range(n)]
    cols = [{c: load_npy(p.file(f"{c}.npy"), mmap=True) for c in ("i", "j", "sim")}
            for p in parts]
    total = sum(len(c["i"]) for c in cols)
    n_ranges = max(1, -(-total // max(1, cfg.dedup.spill_edges)))
    bounds = np.linspace(0, n_pool, n_ranges + 1).astype(np.int64)

    def ranges():
        for r in range(n_ranges):
            pieces = []
            for c in cols:
                a, b = np.searchsorted(c["i"], bounds[r: r + 2])
                pieces.append((np.asarray(c["i"][a:b]), np.asarray(c["j"][a:b]),
                               np.asarray(c["sim"][a:b])))
            yield dd.unique_edges(*(np.concatenate([p[k] for p in pieces]) for k in range(3)))

    # each range's i/j/sim go to block files, then one stream per column: the parts are read
    # once and memory holds one range
    tmp_blocks: dict[str, list] = {"i": [], "j": [], "sim": []}
    count = 0
    for e in ranges():
        for name in ("i", "j", "sim"):
            blk_path = out / f".edges_{name}.{len(tmp_blocks[name])}.npy"
            save_npy(blk_path, getattr(e, name))
            tmp_blocks[name].append(blk_path)
        count += len(e)
    for name, dtype in (("i", np.int64), ("j", np.int64), ("sim", np.float32)):
        _write_npy_stream(out / f"edges_{name}.npy", dtype, tmp_blocks[name])
        for p in tmp_blocks[name]:
            p.unlink()
    return count


def _knn_merge(cfg: CurationConfig, key: str, n: int) -> dict:
    stage = Stage(work_dir(cfg), "knn")
    pool_ids, _ = role_positions(cfg, "pool")
    count = _merge_edges(cfg, n, len(pool_ids), stage.dir)
    for name in ("eval_sim", "eval_id"):
        _write_npy_stream(stage.dir / f"{name}.npy", np.float32 if name == "eval_sim" else
                          np.int64, [Part(stage, p, n).file(f"{name}.npy") for p in range(n)])
    save_npy(stage.dir / "pool_ids.npy", pool_ids)
    summary = {"pool": len(pool_ids), "edges": count, "parts": n,
               "merge_peak_rss_gib": round(peak_rss_gib(), 3)}
    stage.mark_done(key, summary)
    return summary


def stage_knn(cfg: CurationConfig, part: tuple[int, int] | None = None,
              merge: int | bool = False) -> dict:
    """The kNN graph of the pool: one part, the merge, or (neither) the whole graph."""
    stage = Stage(work_dir(cfg), "knn")
    key = knn_key(cfg)

    def index_id() -> dict:
        idx = Stage(stage.dir, f"index-{key}")
        return {"index": open_index(idx.dir).id} if idx.is_done(key) else {}

    return split_stage(stage, key, part, merge, lambda i, n: _knn_part(cfg, key, i, n),
                       lambda n, _: _knn_merge(cfg, key, n), extra=index_id, shared=index_id)


def _knn_ready(cfg: CurationConfig) -> None:
    """The kNN graph merged: done, or merge a complete split, else a one-line error."""
    stage = Stage(work_dir(cfg), "knn")
    key = knn_key(cfg)
    if stage.is_done(key):
        return
    n = complete_split(stage, key)
    if n is None:
        raise UserError("the k-NN graph of dedup is not complete; run `dinosys-curate dedup "
                        "CONFIG --part i/n` for every part (or `dinosys-curate dedup CONFIG`)")
    stage_knn(cfg, merge=n)


def _candidates(cfg: CurationConfig) -> tuple[dd.Edges, np.ndarray, np.ndarray]:
    """(edges, candidate edge indices to verify, sure edges mask) of the merged graph."""
    d = work_dir(cfg) / "knn"
    edges = dd.Edges(load_npy(d / "edges_i.npy", mmap=True), load_npy(d / "edges_j.npy", mmap=True),
                     load_npy(d / "edges_sim.npy", mmap=True))
    vcfg = cfg.dedup.verify
    sim = np.asarray(edges.sim)
    above = sim > cfg.dedup.threshold
    sure = above & (sim >= (np.inf if vcfg.accept_above is None else vcfg.accept_above))
    return edges, np.flatnonzero(above & ~sure), sure


def _loader(cfg: CurationConfig, pool_ids: np.ndarray):
    cols = items(cfg)
    item_row = np.searchsorted(cols["id"], pool_ids)
    path, member, offset, size = cols["path"], cols["member"], cols["offset"], cols["size"]

    def load(row: int) -> bytes:
        r = item_row[row]
        return read_item_bytes(str(path[r]), str(member[r]), int(offset[r]), int(size[r]))

    return load


def _verify_run(cfg: CurationConfig, part: tuple[int, int]):
    edges, cand, _ = _candidates(cfg)
    pool_ids = load_npy(work_dir(cfg) / "knn" / "pool_ids.npy")
    max_pixels = dict(embed_stages(cfg))[dedup_embed_stage(cfg)].max_image_pixels
    out = work_dir(cfg) / "dedup" / f"verify-{dedup_key(cfg)}"
    return verify.verify_edges(np.asarray(edges.i)[cand], np.asarray(edges.j)[cand],
                               _loader(cfg, pool_ids), cfg.dedup.verify, out, max_pixels,
                               cfg.progress, part)


def stage_verify(cfg: CurationConfig, part: tuple[int, int] | None = None,
                 merge: int | bool = False) -> dict:
    """Geometric verification of the candidate pairs by blocks: part ``i`` of ``n`` verifies
    blocks ``b % n == i`` (nothing to do when ``dedup.verify`` is off). Without ``--part``,
    nothing runs here: the dedup merge verifies what no part did."""
    _knn_ready(cfg)
    if part is None:
        return {"verify": "done by the dedup merge"}
    stage = Stage(work_dir(cfg), "verify")
    key = dedup_key(cfg)

    def work(i: int, n: int) -> dict:
        if not cfg.dedup.verify.enabled:
            return {"verified": 0, "enabled": False}
        res = _verify_run(cfg, (i, n))
        return {"blocks": len(range(i, verify.n_blocks(len(res.status), cfg.dedup.verify), n)),
                "confirmed": int(res.confirmed.sum())}

    return split_stage(stage, key, part, False, work, lambda n, r: {})


def _verify_all(cfg: CurationConfig, edges: dd.Edges, cand: np.ndarray, sure: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per edge: verification status and correlation (blocks done by verify parts are read
    back; a split of verify parts must be complete)."""
    vstage = Stage(work_dir(cfg), "verify")
    splits = sorted(int(p.name) for p in (vstage.dir / "parts").glob("*")
                    if p.name.isdigit()) if (vstage.dir / "parts").is_dir() else []
    key = dedup_key(cfg)
    if splits and complete_split(vstage, key) is None:
        check_parts(vstage, splits[-1], key)  # raises, naming the missing or stale part
    t0 = time.time()
    res = _verify_run(cfg, (0, 1))
    status = np.full(len(edges), verify.UNCHECKED, dtype=np.int8)
    status[sure] = verify.ACCEPTED
    status[cand] = res.status
    corr = np.zeros(len(edges), dtype=np.float32)
    corr[cand] = res.correlation
    summary = {"verify_candidates": int(len(cand) + sure.sum()),
               "verify_accepted_unchecked": int(sure.sum()),
               "verify_confirmed": int(res.confirmed.sum()),
               "verify_confirmed_mirrored": int((res.status == verify.CONFIRMED_FLIP).sum()),
               "verify_rejected": int((res.status == verify.REJECTED).sum()),
               "verify_undecodable": int((res.status == verify.UNDECODABLE).sum()),
               "verify_seconds": round(time.time() - t0, 2)}
    log.info("verify: %d of %d candidate pairs confirmed as copies (%.1f s)",
             summary["verify_confirmed"], len(cand), summary["verify_seconds"])
    if summary["verify_undecodable"]:
        log.warning("verify: %d candidate pairs had an image that no longer decodes; they are "
                    "not merged", summary["verify_undecodable"])
    return status, corr, summary


def _dedup_merge(cfg: CurationConfig, key: str) -> dict:
    work = work_dir(cfg)
    stage = Stage(work, "dedup")
    kdir = work / "knn"
    pool_ids = load_npy(kdir / "pool_ids.npy")
    n = len(pool_ids)
    edges, cand, sure = _candidates(cfg)
    spill = cfg.dedup.spill_edges
    priority = None
    if cfg.dedup.representative == "largest":
        dec = load_table(work / dedup_embed_stage(cfg) / "decoded.parquet").to_pydict()
        area = dict(zip(dec["id"], np.asarray(dec["width"]) * np.asarray(dec["height"])))
        priority = np.array([area.get(int(i), 0) for i in pool_ids], dtype=np.float64)
    status = np.full(len(edges), verify.UNCHECKED, dtype=np.int8)
    corr = np.zeros(len(edges), dtype=np.float32)
    group_edges = edges
    verify_summary: dict = {}
    if cfg.dedup.verify.enabled:
        status, corr, verify_summary = _verify_all(cfg, edges, cand, sure)
        merged = status > 0  # confirmed, confirmed mirrored, accepted unchecked
        group_edges = dd.Edges(np.asarray(edges.i)[merged], np.asarray(edges.j)[merged],
                               np.asarray(edges.sim)[merged])
    result = dd.dedup(n, group_edges, cfg.dedup.threshold, priority, spill)
    eval_ids, _ = role_positions(cfg, "eval")
    if len(eval_ids) and n:
        e_sim = load_npy(kdir / "eval_sim.npy")[:, None]
        e_id = load_npy(kdir / "eval_id.npy")[:, None]
        con = dd.decontaminate(n, edges, e_sim, e_id, cfg.dedup.decontam_threshold, spill)
        eval_match = np.where(con.eval_match >= 0, eval_ids[np.maximum(con.eval_match, 0)], -1)
    else:
        con = dd.DecontamResult(np.zeros(n, bool), np.full(n, -1), np.zeros(n, np.float32))
        eval_match = con.eval_match
    keep = result.keep & ~con.drop
    save_table(stage.dir / "pool.parquet", {
        "id": pool_ids, "dedup_group": result.labels, "rep_id": pool_ids[result.rep],
        "dedup_sim": result.best_sim, "contaminated": con.drop, "eval_match": eval_match,
        "eval_sim": con.eval_sim, "keep": keep})
    save_npy(stage.dir / "edges_i.npy", pool_ids[np.asarray(edges.i)])
    save_npy(stage.dir / "edges_j.npy", pool_ids[np.asarray(edges.j)])
    save_npy(stage.dir / "edges_sim.npy", np.asarray(edges.sim))
    save_npy(stage.dir / "edges_verified.npy", status)
    save_npy(stage.dir / "edges_correlation.npy", corr)
    sweep = dd.sweep(n, edges, cfg.dedup.sweep, spill)
    for row in sweep:
        if row["example"] is not None:
            i, j, s = row["example"]
            row["example"] = [int(pool_ids[i]), int(pool_ids[j]), s]
    save_json(stage.dir / "sweep.json", sweep)
    summary = {"pool": n, "edges": int((np.asarray(edges.sim) > cfg.dedup.threshold).sum()),
               **verify_summary, "groups": int(result.labels.max() + 1) if n else 0,
               "near_duplicates": int((~result.keep).sum()),
               "contaminated": int(con.drop.sum()), "kept": int(keep.sum()),
               "merge_peak_rss_gib": round(peak_rss_gib(), 3)}
    stage.mark_done(key, summary)
    return summary


def stage_dedup(cfg: CurationConfig, part: tuple[int, int] | None = None,
                merge: int | bool = False) -> dict:
    """``--part i/n``: kNN part ``i``; ``--merge``: merge the kNN parts (and verification) into
    copy groups and decontamination; neither: all of it here (or merge complete parts)."""
    if part is not None:
        return stage_knn(cfg, part)
    stage = Stage(work_dir(cfg), "dedup")
    if merge:
        stage_knn(cfg, merge=merge)
    else:
        stage_knn(cfg)
    key = dedup_key(cfg)
    return merge_once(stage, key, lambda: _dedup_merge(cfg, key))


def knn_parts_dir(cfg: CurationConfig, n: int):
    """Where the ``n`` kNN parts write (tests, benchmark)."""
    return parts_dir(Stage(work_dir(cfg), "knn"), n)
