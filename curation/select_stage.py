"""Clustering and retrieval split over parts.

``cluster``: the centroid tree is trained once (``cluster/tree-<digest>/``, by the first part
to get there, on the kept images or a seeded sample of ``cluster.max_train_points``), then part
``i`` of ``n`` assigns kept images ``[i*K/n, (i+1)*K/n)`` to the finest centroids; the merge
writes every level's labels and the cluster paths. ``retrieve``: part ``i`` finds every query's
exact top-k in its slice of the kept images; the merge takes the best k over the slices, then
selects (sample- and cluster-based, per-source cap, balancing) as one process.
"""

from __future__ import annotations

import numpy as np

from curation.hierarchical import ClusterTree, balanced_sample, level_labels, train_tree
from curation.kmeans import assign
from curation.parts import Part, merge_once, peak_rss_gib, split_stage
from curation.retrieve import merge_topk, retrieve, sample_knn
from curation.shared_index import RowReader
from curation.store import Stage, digest, load_npy, load_table, save_npy, save_table
from curation.work import items, need, pool_table, role_rows, work_dir
from dinosys.config import to_dict
from dinosys.errors import UserError


def _kept(cfg) -> tuple[np.ndarray, RowReader]:
    """Ids of the images dedup kept, and a reader of their main embeddings."""
    pool = pool_table(cfg)
    kept_ids = pool["id"][pool["keep"]]
    ids = load_npy(work_dir(cfg) / "embed" / "ids.npy")
    return kept_ids, RowReader(work_dir(cfg) / "embed" / "embeddings.npy",
                               np.searchsorted(ids, kept_ids))


def cluster_key(cfg) -> str:
    """Digest of the clustering: dedup, the main embedding, the cluster config."""
    work = work_dir(cfg)
    cluster_cfg = {k: v for k, v in to_dict(cfg.cluster).items() if k != "target_size"}
    return digest("cluster", need(Stage(work, "dedup"), "dedup"), need(Stage(work, "embed"),
                                                                       "embed"), cluster_cfg)


def _tree(cfg, key: str, reader: RowReader) -> ClusterTree:
    """The trained centroid tree (trained once, then read by every part)."""
    stage = Stage(work_dir(cfg) / "cluster", f"tree-{key}")
    levels = len(cfg.cluster.levels)

    def make() -> dict:
        n = len(reader)
        if n == 0:
            raise UserError("nothing left to cluster after deduplication; check "
                            "sources/thresholds")
        cap = cfg.cluster.max_train_points
        if cap is not None and n > cap:
            rng = np.random.default_rng(cfg.cluster.seed)
            x = reader.take(np.sort(rng.choice(n, cap, replace=False)))
        else:
            x = reader.read(0, n)
        tree = train_tree(x, cfg.cluster)
        for level in range(levels):
            save_npy(stage.dir / f"centroids_{level}.npy", tree.centroids[level])
            save_npy(stage.dir / f"parents_{level}.npy", tree.parents[level])
        stage.mark_done(key, {"train_points": len(x)})
        return stage.summary()

    merge_once(stage, key, make)
    tree = ClusterTree()
    for level in range(levels):
        tree.centroids.append(load_npy(stage.dir / f"centroids_{level}.npy"))
        tree.parents.append(load_npy(stage.dir / f"parents_{level}.npy"))
    return tree


def stage_cluster(cfg, part: tuple[int, int] | None = None, merge: int | bool = False) -> dict:
    """Hierarchical k-means (with resampling) of the deduplicated pool, assigned by parts."""
    stage = Stage(work_dir(cfg), "cluster")
    key = cluster_key(cfg)

    def work(i: int, n: int) -> dict:
        kept_ids, reader = _kept(cfg)
        tree = _tree(cfg, key, reader)
        lo, hi = i * len(kept_ids) // n, (i + 1) * len(kept_ids) // n
        labels = np.empty(hi - lo, dtype=np.int64)
        step = cfg.cluster.chunk_size
        for b in range(lo, hi, step):
            labels[b - lo: b - lo + step] = assign(reader.read(b, min(hi, b + step)),
                                                   tree.centroids[0], step)[0]
        save_npy(Part(stage, i, n).file("labels.npy"), labels)
        return {"points": hi - lo}

    def combine(n: int, _: list) -> dict:
        kept_ids, reader = _kept(cfg)
        tree = _tree(cfg, key, reader)
        labels0 = np.concatenate([load_npy(Part(stage, i, n).file("labels.npy"))
                                  for i in range(n)])
        tree.labels = level_labels(tree, labels0)
        for level, (labels, cents) in enumerate(zip(tree.labels, tree.centroids)):
            save_npy(stage.dir / f"labels_{level}.npy", labels)
            save_npy(stage.dir / f"centroids_{level}.npy", cents)
        save_table(stage.dir / "clusters.parquet", {"id": kept_ids, "cluster_path": tree.paths(),
                                                    "cluster": tree.labels[0]})
        sizes = np.bincount(tree.labels[0], minlength=len(tree.centroids[0]))
        summary = {"points": int(len(kept_ids)), "levels": [int(len(c)) for c in tree.centroids],
                   "largest_cluster": int(sizes.max()), "smallest_cluster": int(sizes.min()),
                   "parts": n, "merge_peak_rss_gib": round(peak_rss_gib(), 3)}
        stage.mark_done(key, summary)
        return summary

    return split_stage(stage, key, part, merge, work, combine)


def _load_tree(cfg) -> ClusterTree:
    d = work_dir(cfg) / "cluster"
    tree = ClusterTree()
    for level in range(len(cfg.cluster.levels)):
        tree.labels.append(load_npy(d / f"labels_{level}.npy"))
        tree.centroids.append(load_npy(d / f"centroids_{level}.npy"))
    return tree


def retrieve_key(cfg) -> str:
    """Digest of the selection: the clustering, the retrieval config, target size and seed."""
    return digest("retrieve", need(Stage(work_dir(cfg), "cluster"), "cluster"),
                  to_dict(cfg.retrieve), cfg.cluster.target_size, cfg.seed)


def _queries(cfg) -> tuple[np.ndarray, np.ndarray]:
    ids, emb = role_rows(cfg, "query")
    return ids, RowReader(work_dir(cfg) / "embed" / "embeddings.npy", emb).read(0, len(emb))


def stage_retrieve(cfg, part: tuple[int, int] | None = None, merge: int | bool = False) -> dict:
    """Select the pool images to keep: retrieval for the query set and/or balanced sampling."""
    work = work_dir(cfg)
    stage = Stage(work, "retrieve")
    key = retrieve_key(cfg)
    k = cfg.retrieve.k

    def work_part(i: int, n: int) -> dict:
        if not cfg.retrieve.queries:
            return {"queries": 0}
        kept_ids = load_table(work / "cluster" / "clusters.parquet").column("id").to_numpy()
        ids = load_npy(work / "embed" / "ids.npy")
        reader = RowReader(work / "embed" / "embeddings.npy", np.searchsorted(ids, kept_ids))
        _, q = _queries(cfg)
        lo, hi = i * len(kept_ids) // n, (i + 1) * len(kept_ids) // n
        sims, nbrs = sample_knn(reader.read(lo, hi), q, k, lo)
        p = Part(stage, i, n)
        save_npy(p.file("sims.npy"), sims)
        save_npy(p.file("ids.npy"), nbrs)
        return {"queries": int(len(q)), "pool_slice": hi - lo}

    def combine(n: int, _: list) -> dict:
        clusters = load_table(work / "cluster" / "clusters.parquet").to_pydict()
        kept_ids = np.asarray(clusters["id"], dtype=np.int64)
        tree = _load_tree(cfg)
        m = len(kept_ids)
        reason = np.full(m, "kept", dtype=object)
        similarity = np.zeros(m, dtype=np.float32)
        selected = np.ones(m, dtype=bool)
        summary: dict = {"candidates": m}
        if cfg.retrieve.queries:
            query_ids, q = _queries(cfg)
            topk = merge_topk([(load_npy(Part(stage, i, n).file("sims.npy")),
                                load_npy(Part(stage, i, n).file("ids.npy"))) for i in range(n)],
                              k)
            cols = items(cfg)
            sources = cols["source"][np.searchsorted(cols["id"], kept_ids)]
            res = retrieve(m, q, tree.labels[0], tree.centroids[0], sources, cfg.retrieve, topk,
                           cfg.seed)
            selected = res.selected
            similarity = res.similarity
            reason = np.where(res.selected, np.char.add("retrieval:", res.reason),
                              "not_retrieved")
            reason = np.where(res.capped, "retrieval_source_cap", reason).astype(object)
            summary.update(queries=int(len(query_ids)),
                           retrieved_sample=int((res.selected & (res.reason == "sample")).sum()),
                           retrieved_cluster=int((res.selected
                                                  & (res.reason == "cluster")).sum()),
                           capped=int(res.capped.sum()))
        if cfg.cluster.target_size is not None:
            picked = balanced_sample(tree, cfg.cluster.target_size, cfg.seed,
                                     candidates=selected)
            chosen = np.zeros(m, dtype=bool)
            chosen[picked] = True
            reason = np.where(selected & ~chosen, "balancing", reason)
            reason = np.where(chosen & (reason == "kept"), "balanced_sample",
                              reason).astype(object)
            selected = chosen
        save_table(stage.dir / "selection.parquet", {"id": kept_ids, "selected": selected,
                                                     "reason": reason.astype(str).tolist(),
                                                     "similarity": similarity})
        summary["selected"] = int(selected.sum())
        stage.mark_done(key, summary)
        return summary

    return split_stage(stage, key, part, merge, work_part, combine)
