"""The curation stages over one work directory, each idempotent behind a done-marker.

``work/ingest`` (item table) -> ``work/embed`` (fp16 embeddings) -> ``work/dedup`` (copy groups,
decontamination) -> ``work/cluster`` (hierarchical k-means) -> ``work/retrieve`` (selection) ->
``work/shards`` (WebDataset + manifest) -> report. A stage's digest covers its config and the
digest of the stage before it, so changing e.g. ``dedup.threshold`` re-runs dedup and everything
after it, and nothing before.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from curation import dedup as dd
from curation import verify
from curation.backbone import load_feature_model
from curation.config import CurationConfig, EmbedConfig, IndexConfig
from curation.embed import embed_chunks, merge_chunks, n_chunks
from curation.hierarchical import balanced_sample, hierarchical_kmeans
from curation.ingest import ingest, read_item_bytes
from curation.knn import knn
from curation.retrieve import retrieve
from curation.store import Stage, digest, load_npy, load_table, save_json, save_npy, save_table
from dinosys.config import to_dict
from dinosys.errors import UserError

log = logging.getLogger(__name__)


def work_dir(cfg: CurationConfig) -> Path:
    """The output directory of the run."""
    return Path(cfg.out)


def _sources(cfg: CurationConfig) -> list:
    if not cfg.sources:
        raise UserError("config key 'sources': no image sources given (add sources: - path: DIR)")
    return ([("pool", s) for s in cfg.sources] + [("eval", s) for s in cfg.dedup.eval_sources]
            + [("query", s) for s in cfg.retrieve.queries])


def _path_stat(path: str) -> list:
    p = Path(path.split("{")[0])
    try:
        st = p.stat()
        return [str(p), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(p), None, None]


def items(cfg: CurationConfig) -> dict[str, np.ndarray]:
    """The ingested item table as numpy columns."""
    table = load_table(work_dir(cfg) / "ingest" / "items.parquet")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def stage_ingest(cfg: CurationConfig, force: bool = False) -> dict:
    """List and hash every input image; mark exact duplicates and unreadable files."""
    stage = Stage(work_dir(cfg), "ingest")
    srcs = _sources(cfg)
    key = digest("ingest", [(r, to_dict(s), _path_stat(s.path)) for r, s in srcs])
    if stage.is_done(key) and not force:
        return stage.summary()
    cols = ingest(srcs, progress=cfg.progress)
    save_table(stage.dir / "items.parquet", cols)
    status = np.asarray(cols["status"])
    summary = {"images": len(status), "exact_duplicates": int((status == "exact_duplicate").sum()),
               "unreadable": int((status == "unreadable").sum())}
    stage.mark_done(key, summary)
    return summary


def wait_for(stage: Stage, timeout_s: float = 24 * 3600, poll_s: float = 2.0) -> None:
    """Block until another process has finished ``stage`` (parts > 0 wait for part 0's ingest)."""
    deadline = time.monotonic() + timeout_s
    while not stage.marker.is_file():
        if time.monotonic() > deadline:
            raise UserError(f"timed out waiting for stage {stage.name} in {stage.dir}")
        time.sleep(poll_s)


def embed_stages(cfg: CurationConfig) -> list[tuple[str, EmbedConfig]]:
    """The embedding passes: ``embed`` (clustering, retrieval, and dedup unless a copy model is
    set) and, with ``copy_embed``, ``embed_copy`` (dedup and decontamination only)."""
    stages = [("embed", cfg.embed)]
    if cfg.copy_embed is not None:
        stages.append(("embed_copy", cfg.copy_embed))
    return stages


def dedup_embed_stage(cfg: CurationConfig) -> str:
    """The embedding stage that dedup and decontamination read."""
    return "embed_copy" if cfg.copy_embed is not None else "embed"


def stage_embed(cfg: CurationConfig, part: tuple[int, int] = (0, 1),
                max_chunks: int | None = None) -> dict:
    """Embed this part's chunks with every embedding model; merge each when all its chunks
    exist. Parts > 0 wait for ingest. The summary is the main model's (and ``copy_embed``'s)."""
    work = work_dir(cfg)
    ingest_stage = Stage(work, "ingest")
    if part[0] == 0:
        stage_ingest(cfg)
    else:
        wait_for(ingest_stage)
    summaries = {name: _embed_one(cfg, name, ecfg, part, max_chunks)
                 for name, ecfg in embed_stages(cfg)}
    summary = summaries["embed"]
    if "embed_copy" in summaries:
        summary = {**summary, "copy_embed": summaries["embed_copy"]}
    return summary


def _embed_one(cfg: CurationConfig, name: str, ecfg: EmbedConfig, part: tuple[int, int],
               max_chunks: int | None) -> dict:
    work = work_dir(cfg)
    stage = Stage(work, name)
    embed_cfg = {k: v for k, v in to_dict(ecfg).items() if k != "num_workers"}
    key = digest("embed", Stage(work, "ingest").done_digest(), embed_cfg)
    if stage.is_done(key):
        return stage.summary()
    cols = items(cfg)
    ok = cols["status"] == "ok"
    rows = {k: v[ok] for k, v in cols.items()}
    if not len(rows["id"]):
        raise UserError(f"no readable images in the sources ({len(ok)} listed); check the paths")
    chunk_dir = stage.dir / f"chunks-{key}"
    total = n_chunks(len(rows["id"]), ecfg.chunk_size)
    fm = load_feature_model(ecfg.model, ecfg.mean, ecfg.std)
    t0 = time.time()
    written = embed_chunks(fm, rows, ecfg, chunk_dir, part, max_chunks, cfg.progress)
    elapsed = time.time() - t0
    done = sum(1 for c in range(total) if (chunk_dir / f"chunk-{c:06d}.json").is_file())
    summary = {"chunks_total": total, "chunks_done": done, "chunks_written_now": written,
               "seconds": round(elapsed, 2), "part": f"{part[0]}/{part[1]}"}
    if done < total:
        log.info("%s: %d of %d chunks done; other parts or a re-run do the rest", name, done,
                 total)
        return summary
    merged = merge_chunks(chunk_dir, total)
    save_npy(stage.dir / "embeddings.npy", merged["emb"])
    save_npy(stage.dir / "ids.npy", merged["ids"])
    save_table(stage.dir / "decoded.parquet", {"id": merged["ids"], "width": merged["width"],
                                               "height": merged["height"]})
    save_table(stage.dir / "failures.parquet", {"id": merged["failed_ids"],
                                                "reason": list(merged["failed_reasons"])})
    summary.update(embedded=int(len(merged["ids"])), decode_failures=int(len(merged["failed_ids"])),
                   dim=int(merged["emb"].shape[1]))
    stage.mark_done(key, summary)
    return summary


def embeddings(cfg: CurationConfig, stage: str = "embed") -> tuple[np.ndarray, np.ndarray]:
    """(ids, fp16 embeddings) of every decoded image, sorted by id, from one embedding stage."""
    d = work_dir(cfg) / stage
    return load_npy(d / "ids.npy"), load_npy(d / "embeddings.npy", mmap=True)


def _role_rows(cfg: CurationConfig, role: str,
               stage: str = "embed") -> tuple[np.ndarray, np.ndarray]:
    """(ids, row indices in ``stage``'s embeddings) of the decoded images with ``role``."""
    cols = items(cfg)
    ids, _ = embeddings(cfg, stage)
    role_ids = cols["id"][(cols["role"] == role) & (cols["status"] == "ok")]
    rows = np.searchsorted(ids, role_ids)
    found = (rows < len(ids)) & (ids[np.minimum(rows, len(ids) - 1)] == role_ids)
    return role_ids[found], rows[found]


def _need(stage: Stage, name: str) -> str:
    dig = stage.done_digest()
    if dig is None:
        raise UserError(f"stage '{stage.name}' has not finished in {stage.dir.parent}; "
                        f"run `dinosys-curate {name}` (or `run`) first")
    return dig


def stage_dedup(cfg: CurationConfig) -> dict:
    """k-NN graph of the pool, copy groups, decontamination against the evaluation sets."""
    work = work_dir(cfg)
    stage = Stage(work, "dedup")
    source = dedup_embed_stage(cfg)
    key = digest("dedup", _need(Stage(work, source), "embed"), to_dict(cfg.dedup),
                 to_dict(cfg.index))
    if stage.is_done(key):
        return stage.summary()
    _, emb = embeddings(cfg, source)
    pool_ids, pool_rows = _role_rows(cfg, "pool", source)
    x = np.asarray(emb[pool_rows], dtype=np.float32)
    n = len(x)
    low = min([cfg.dedup.threshold, cfg.dedup.decontam_threshold, *cfg.dedup.sweep])
    sims, nbrs = knn(x, cfg.dedup.k, cfg.index, progress=cfg.progress, seed=cfg.seed)
    edges = dd.knn_edges(sims, nbrs, low)
    priority = None
    if cfg.dedup.representative == "largest":
        dec = load_table(work / "embed" / "decoded.parquet").to_pydict()
        area = dict(zip(dec["id"], np.asarray(dec["width"]) * np.asarray(dec["height"])))
        priority = np.array([area.get(int(i), 0) for i in pool_ids], dtype=np.float64)
    status = np.full(len(edges), verify.UNCHECKED, dtype=np.int8)
    corr = np.zeros(len(edges), dtype=np.float32)
    group_edges = edges
    verify_summary: dict = {}
    if cfg.dedup.verify.enabled:
        status, corr, verify_summary = _verify_candidates(cfg, stage.dir / f"verify-{key}",
                                                          edges, pool_ids)
        merged = status > 0  # confirmed, confirmed mirrored, accepted unchecked
        group_edges = dd.Edges(edges.i[merged], edges.j[merged], edges.sim[merged])
    result = dd.dedup(n, group_edges, cfg.dedup.threshold, priority)
    eval_ids, eval_rows = _role_rows(cfg, "eval", source)
    if len(eval_ids) and n:
        e = np.asarray(emb[eval_rows], dtype=np.float32)
        flat = IndexConfig(kind="flat", use_gpu=cfg.index.use_gpu)
        pe_s, pe_i = knn(e, min(cfg.dedup.k, len(e)), flat, xq=x)
        con = dd.decontaminate(n, edges, pe_s, pe_i, cfg.dedup.decontam_threshold)
        eval_match = np.where(con.eval_match >= 0, eval_ids[np.maximum(con.eval_match, 0)], -1)
    else:
        con = dd.DecontamResult(np.zeros(n, bool), np.full(n, -1), np.zeros(n, np.float32))
        eval_match = con.eval_match
    keep = result.keep & ~con.drop
    save_table(stage.dir / "pool.parquet", {
        "id": pool_ids, "dedup_group": result.labels, "rep_id": pool_ids[result.rep],
        "dedup_sim": result.best_sim, "contaminated": con.drop, "eval_match": eval_match,
        "eval_sim": con.eval_sim, "keep": keep})
    save_npy(stage.dir / "edges_i.npy", pool_ids[edges.i])
    save_npy(stage.dir / "edges_j.npy", pool_ids[edges.j])
    save_npy(stage.dir / "edges_sim.npy", edges.sim)
    save_npy(stage.dir / "edges_verified.npy", status)
    save_npy(stage.dir / "edges_correlation.npy", corr)
    sweep = dd.sweep(n, edges, cfg.dedup.sweep)
    for row in sweep:
        if row["example"] is not None:
            i, j, s = row["example"]
            row["example"] = [int(pool_ids[i]), int(pool_ids[j]), s]
    save_json(stage.dir / "sweep.json", sweep)
    summary = {"pool": n, "edges": len(edges.above(cfg.dedup.threshold)), **verify_summary,
               "groups": int(result.labels.max() + 1) if n else 0,
               "near_duplicates": int((~result.keep).sum()),
               "contaminated": int(con.drop.sum()), "kept": int(keep.sum())}
    stage.mark_done(key, summary)
    return summary


def _verify_candidates(cfg: CurationConfig, out: Path, edges: dd.Edges, pool_ids: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Geometric verification of the edges above ``dedup.threshold`` (those at or above
    ``verify.accept_above`` are taken unchecked): per edge of ``edges`` a status
    (``curation.verify`` codes; -1 below the threshold) and the aligned correlation."""
    cols = items(cfg)
    item_row = np.searchsorted(cols["id"], pool_ids)
    path, member, offset, size = cols["path"], cols["member"], cols["offset"], cols["size"]

    def load(row: int) -> bytes:
        r = item_row[row]
        return read_item_bytes(str(path[r]), str(member[r]), int(offset[r]), int(size[r]))

    vcfg = cfg.dedup.verify
    above = edges.sim > cfg.dedup.threshold
    sure = above & (edges.sim >= (np.inf if vcfg.accept_above is None else vcfg.accept_above))
    cand = np.flatnonzero(above & ~sure)
    t0 = time.time()
    max_pixels = dict(embed_stages(cfg))[dedup_embed_stage(cfg)].max_image_pixels
    res = verify.verify_edges(edges.i[cand], edges.j[cand], load, vcfg, out, max_pixels,
                              cfg.progress)
    status = np.full(len(edges), verify.UNCHECKED, dtype=np.int8)
    status[sure] = verify.ACCEPTED
    status[cand] = res.status
    corr = np.zeros(len(edges), dtype=np.float32)
    corr[cand] = res.correlation
    summary = {"verify_candidates": int(above.sum()), "verify_accepted_unchecked": int(sure.sum()),
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


def pool_table(cfg: CurationConfig) -> dict[str, np.ndarray]:
    """The dedup stage's per-pool-image table as numpy columns."""
    t = load_table(work_dir(cfg) / "dedup" / "pool.parquet")
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


def stage_cluster(cfg: CurationConfig) -> dict:
    """Hierarchical k-means (with resampling) of the deduplicated pool."""
    work = work_dir(cfg)
    stage = Stage(work, "cluster")
    cluster_cfg = {k: v for k, v in to_dict(cfg.cluster).items() if k != "target_size"}
    key = digest("cluster", _need(Stage(work, "dedup"), "dedup"),
                 _need(Stage(work, "embed"), "embed"), cluster_cfg)
    if stage.is_done(key):
        return stage.summary()
    pool = pool_table(cfg)
    kept_ids = pool["id"][pool["keep"]]
    ids, emb = embeddings(cfg)
    x = np.asarray(emb[np.searchsorted(ids, kept_ids)], dtype=np.float32)
    if len(x) == 0:
        raise UserError("nothing left to cluster after deduplication; check sources/thresholds")
    tree = hierarchical_kmeans(x, cfg.cluster)
    for level, (labels, cents) in enumerate(zip(tree.labels, tree.centroids)):
        save_npy(stage.dir / f"labels_{level}.npy", labels)
        save_npy(stage.dir / f"centroids_{level}.npy", cents)
    save_table(stage.dir / "clusters.parquet", {"id": kept_ids, "cluster_path": tree.paths(),
                                                "cluster": tree.labels[0]})
    sizes = np.bincount(tree.labels[0], minlength=len(tree.centroids[0]))
    summary = {"points": int(len(x)), "levels": [int(len(c)) for c in tree.centroids],
               "largest_cluster": int(sizes.max()), "smallest_cluster": int(sizes.min())}
    stage.mark_done(key, summary)
    return summary


def _load_tree(cfg: CurationConfig):
    from curation.hierarchical import ClusterTree

    d = work_dir(cfg) / "cluster"
    tree = ClusterTree()
    for level in range(len(cfg.cluster.levels)):
        tree.labels.append(load_npy(d / f"labels_{level}.npy"))
        tree.centroids.append(load_npy(d / f"centroids_{level}.npy"))
    return tree


def stage_retrieve(cfg: CurationConfig) -> dict:
    """Select the pool images to keep: retrieval for the query set and/or balanced sampling."""
    work = work_dir(cfg)
    stage = Stage(work, "retrieve")
    key = digest("retrieve", _need(Stage(work, "cluster"), "cluster"), to_dict(cfg.retrieve),
                 cfg.cluster.target_size, cfg.seed)
    if stage.is_done(key):
        return stage.summary()
    clusters = load_table(work / "cluster" / "clusters.parquet").to_pydict()
    kept_ids = np.asarray(clusters["id"], dtype=np.int64)
    tree = _load_tree(cfg)
    n = len(kept_ids)
    reason = np.full(n, "kept", dtype=object)
    similarity = np.zeros(n, dtype=np.float32)
    selected = np.ones(n, dtype=bool)
    summary: dict = {"candidates": n}
    query_ids, query_rows = _role_rows(cfg, "query")
    if cfg.retrieve.queries:
        ids, emb = embeddings(cfg)
        x = np.asarray(emb[np.searchsorted(ids, kept_ids)], dtype=np.float32)
        q = np.asarray(emb[query_rows], dtype=np.float32)
        cols = items(cfg)
        sources = cols["source"][np.searchsorted(cols["id"], kept_ids)]
        res = retrieve(x, q, tree.labels[0], tree.centroids[0], sources, cfg.retrieve, cfg.index,
                       cfg.seed)
        selected = res.selected
        similarity = res.similarity
        reason = np.where(res.selected, np.char.add("retrieval:", res.reason), "not_retrieved")
        reason = np.where(res.capped, "retrieval_source_cap", reason).astype(object)
        summary.update(queries=int(len(query_ids)),
                       retrieved_sample=int((res.selected & (res.reason == "sample")).sum()),
                       retrieved_cluster=int((res.selected & (res.reason == "cluster")).sum()),
                       capped=int(res.capped.sum()))
    if cfg.cluster.target_size is not None:
        picked = balanced_sample(tree, cfg.cluster.target_size, cfg.seed, candidates=selected)
        chosen = np.zeros(n, dtype=bool)
        chosen[picked] = True
        reason = np.where(selected & ~chosen, "balancing", reason)
        reason = np.where(chosen & (reason == "kept"), "balanced_sample", reason).astype(object)
        selected = chosen
    save_table(stage.dir / "selection.parquet", {"id": kept_ids, "selected": selected,
                                                 "reason": reason.astype(str).tolist(),
                                                 "similarity": similarity})
    summary["selected"] = int(selected.sum())
    stage.mark_done(key, summary)
    return summary


def run_all(cfg: CurationConfig, part: tuple[int, int] = (0, 1)) -> dict:
    """Every stage in order (parts > 0 only embed, then return)."""
    from curation.report import stage_report
    from curation.shards import stage_shard

    summary = {"embed": stage_embed(cfg, part)}
    if part[0] != 0:
        return summary
    for name, _ in embed_stages(cfg):
        if not Stage(work_dir(cfg), name).marker.is_file():
            wait_for(Stage(work_dir(cfg), name))
    for name, fn in (("dedup", stage_dedup), ("cluster", stage_cluster),
                     ("retrieve", stage_retrieve), ("shard", stage_shard),
                     ("report", stage_report)):
        log.info("stage %s", name)
        summary[name] = fn(cfg)
    summary["out"] = str(work_dir(cfg))
    return summary


def part_from_env() -> tuple[int, int]:
    """This process's part: torchrun RANK/WORLD_SIZE, else a Slurm array task, else 0/1."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - lo, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1
