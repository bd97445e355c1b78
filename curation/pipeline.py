"""The curation stages over one work directory, each idempotent behind a done-marker, each
that grows with the pool split into parts (:mod:`curation.parts`) with a merge.

``work/ingest`` (item table) -> ``work/embed`` (fp16 embeddings) -> ``work/knn`` (k-NN edges)
-> ``work/dedup`` (copy groups, decontamination) -> ``work/cluster`` (hierarchical k-means) ->
``work/retrieve`` (selection) -> ``work/shards`` (WebDataset + manifest) -> report. A stage's
digest covers its config and the digest of the stage before it, so changing e.g.
``dedup.threshold`` re-runs dedup and everything after it, and nothing before; the number of
parts is not part of any digest: 1, 2 or 4 parts give the same outputs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from curation.backbone import load_feature_model
from curation.config import CurationConfig, EmbedConfig
from curation.dedup_stage import knn_key, stage_dedup, stage_knn, stage_verify
from curation.embed import embed_chunks, merge_chunks, n_chunks
from curation.ingest import (
    check_unreadable_fraction,
    finish_ingest,
    hash_units,
    list_units,
    units_fingerprint,
)
from curation.parts import Part, complete_split, merge_once, split_stage, wait_parts
from curation.select_stage import cluster_key, retrieve_key, stage_cluster, stage_retrieve
from curation.store import Stage, digest, load_table, save_npy, save_table
from curation.work import embed_stages, items, wait_for, work_dir
from dinosys.config import to_dict
from dinosys.errors import UserError

log = logging.getLogger(__name__)


def _sources(cfg: CurationConfig) -> list:
    if not cfg.sources:
        raise UserError("config key 'sources': no image sources given (add sources: - path: DIR)")
    return ([("pool", s) for s in cfg.sources] + [("eval", s) for s in cfg.dedup.eval_sources]
            + [("query", s) for s in cfg.retrieve.queries])


def ingest_key(cfg: CurationConfig) -> str:
    """Digest of the ingest: the sources, and the size, mtime and ctime of every file it reads
    (not only the top folder's: an image replaced in place must be hashed again)."""
    sources = _sources(cfg)
    return digest("ingest", [(r, to_dict(s)) for r, s in sources],
                  units_fingerprint(list_units(sources)))


def stage_ingest(cfg: CurationConfig, part: tuple[int, int] | None = None,
                 merge: int | bool = False) -> dict:
    """List and hash every input image; mark exact duplicates and unreadable files. Part ``i``
    of ``n`` hashes the source units (blocks of files, shards) ``u % n == i``; the merge numbers
    the items in unit order and finds exact duplicates across parts."""
    stage = Stage(work_dir(cfg), "ingest")
    key = ingest_key(cfg)

    def work(i: int, n: int) -> dict:
        units = list_units(_sources(cfg))
        cols = hash_units(units, list(range(i, len(units), n)), cfg.progress)
        save_table(Part(stage, i, n).file("parquet"), cols)
        return {"units": len(range(i, len(units), n)), "items": len(cols["unit"])}

    def combine(n: int, _: list) -> dict:
        parts = []
        for i in range(n):
            t = load_table(Part(stage, i, n).file("parquet"))
            parts.append({c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names})
        cols = finish_ingest(parts)
        check_unreadable_fraction(cols, cfg.max_unreadable_fraction)
        save_table(stage.dir / "items.parquet", cols)
        status = cols["status"]
        summary = {"images": len(status),
                   "exact_duplicates": int((status == "exact_duplicate").sum()),
                   "unreadable": int((status == "unreadable").sum()), "parts": n}
        stage.mark_done(key, summary)
        return summary

    return split_stage(stage, key, part, merge, work, combine)


def stage_embed(cfg: CurationConfig, part: tuple[int, int] | None = None,
                max_chunks: int | None = None, merge: int | bool = False) -> dict:
    """Embed this part's chunks with every embedding model; merge each when all its chunks
    exist. Parts > 0 wait for ingest. The summary is the main model's (and ``copy_embed``'s).
    The chunks are the parts: any part, or ``--merge``, merges when all chunks exist."""
    part = part or (0, 1)
    work = work_dir(cfg)
    ingest_stage = Stage(work, "ingest")
    if part[0] == 0 or complete_split(ingest_stage, ingest_key(cfg)) is not None:
        stage_ingest(cfg)  # done, or merge its complete parts, or (part 0) run it
    else:
        wait_for(ingest_stage)
    summaries = {name: _embed_one(cfg, name, ecfg, part, max_chunks, bool(merge))
                 for name, ecfg in embed_stages(cfg)}
    summary = summaries["embed"]
    if "embed_copy" in summaries:
        summary = {**summary, "copy_embed": summaries["embed_copy"]}
    return summary


def _embed_one(cfg: CurationConfig, name: str, ecfg: EmbedConfig, part: tuple[int, int],
               max_chunks: int | None, merge_only: bool = False) -> dict:
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
    t0 = time.time()
    written = 0
    if not merge_only:
        fm = load_feature_model(ecfg.model, ecfg.mean, ecfg.std)
        written = embed_chunks(fm, rows, ecfg, chunk_dir, part, max_chunks, cfg.progress)
    elapsed = time.time() - t0
    missing = [c for c in range(total) if not (chunk_dir / f"chunk-{c:06d}.json").is_file()]
    done = total - len(missing)
    if merge_only and missing:
        raise UserError(f"{name}: chunk {missing[0]} of {total} is missing ({len(missing)} in "
                        f"all); run the part that owns it (chunk c belongs to part c % n)")
    summary = {"chunks_total": total, "chunks_done": done, "chunks_written_now": written,
               "seconds": round(elapsed, 2), "part": f"{part[0]}/{part[1]}"}
    if done < total:
        log.info("%s: %d of %d chunks done; other parts or a re-run do the rest", name, done,
                 total)
        return summary

    def combine() -> dict:
        merged = merge_chunks(chunk_dir, total, stage.dir / "embeddings.npy")
        save_npy(stage.dir / "ids.npy", merged["ids"])
        save_table(stage.dir / "decoded.parquet", {"id": merged["ids"], "width": merged["width"],
                                                   "height": merged["height"]})
        save_table(stage.dir / "failures.parquet", {"id": merged["failed_ids"],
                                                    "reason": list(merged["failed_reasons"])})
        summary.update(embedded=int(len(merged["ids"])),
                       decode_failures=int(len(merged["failed_ids"])), dim=merged["dim"])
        stage.mark_done(key, summary)
        return summary

    return merge_once(stage, key, combine)


STAGES: dict[str, Callable] = {
    "ingest": stage_ingest, "embed": stage_embed, "dedup": stage_dedup, "verify": stage_verify,
    "cluster": stage_cluster, "retrieve": stage_retrieve,
}


def run_stage(cfg: CurationConfig, name: str, part: tuple[int, int] | None = None,
              merge: int | bool = False) -> dict:
    """One stage by its command name: one part (``part``), the merge (``merge``), or all of it."""
    from curation.report import stage_report
    from curation.shards import stage_shard

    if name == "report":
        return stage_report(cfg)
    if part is not None and name in UPSTREAM:
        ensure_merged(cfg, UPSTREAM[name])
    fn = stage_shard if name == "shard" else STAGES[name]
    return fn(cfg, part=part, merge=merge)


UPSTREAM = {"cluster": "dedup", "retrieve": "cluster", "shard": "retrieve"}


def ensure_merged(cfg: CurationConfig, name: str) -> None:
    """Stage ``name`` merged: done already, or its parts are all done and get merged here (one
    process merges, concurrent callers wait); else a one-line error naming what is missing."""
    if name == "dedup":
        stage_dedup(cfg, merge=True)  # merges the kNN parts (checked) and the copy groups
        return
    keys = {"cluster": cluster_key, "retrieve": retrieve_key}
    stage = Stage(work_dir(cfg), name)
    key = keys[name](cfg)
    if stage.is_done(key):
        return
    n = complete_split(stage, key)
    run_stage(cfg, name, merge=n if n is not None else True)


def _barrier_merge(cfg: CurationConfig, name: str, key_fn: Callable[[], str], n: int) -> None:
    """After this rank's part: wait for every part of ``name``, then merge it once."""
    stage_dir = {"dedup": "knn", "shard": "shards"}.get(name, name)
    wait_parts(Stage(work_dir(cfg), stage_dir), n, key_fn())
    if name == "dedup":  # the kNN graph only: verification parts come before the dedup merge
        stage_knn(cfg, merge=n)
    else:
        run_stage(cfg, name, merge=n)


def run_all(cfg: CurationConfig, part: tuple[int, int] = (0, 1)) -> dict:
    """Every stage in order. With ``part=(i, n)``, n > 1 (torchrun ranks, ``--local`` tasks,
    array tasks started together) this process runs its part of every split stage, waits for
    the other parts and merges (one process merges, the others wait); ``report`` runs once."""
    from curation.report import stage_report
    from curation.shards import shard_key, stage_shard

    i, n = part
    if n == 1:
        summary = {"ingest": stage_ingest(cfg), "embed": stage_embed(cfg)}
        for name, _ in embed_stages(cfg):
            wait_for(Stage(work_dir(cfg), name))
        for name, fn in (("dedup", stage_dedup), ("cluster", stage_cluster),
                         ("retrieve", stage_retrieve), ("shard", stage_shard),
                         ("report", stage_report)):
            log.info("stage %s", name)
            summary[name] = fn(cfg)
        summary["out"] = str(work_dir(cfg))
        return summary
    from curation.dedup_stage import dedup_key

    summary = {"part": f"{i}/{n}"}
    summary["ingest"] = stage_ingest(cfg, part)
    _barrier_merge(cfg, "ingest", lambda: ingest_key(cfg), n)
    summary["embed"] = stage_embed(cfg, part)
    for name, _ in embed_stages(cfg):
        wait_for(Stage(work_dir(cfg), name))
    for name, key_fn in (("dedup", lambda: knn_key(cfg)), ("verify", lambda: dedup_key(cfg)),
                         ("cluster", lambda: cluster_key(cfg)),
                         ("retrieve", lambda: retrieve_key(cfg)),
                         ("shard", lambda: shard_key(cfg))):
        summary[name] = run_stage(cfg, name, part)
        if name == "verify":
            wait_parts(Stage(work_dir(cfg), "verify"), n, key_fn())
            stage_dedup(cfg, merge=n)
        else:
            _barrier_merge(cfg, name, key_fn, n)
    if i == 0:
        summary["report"] = stage_report(cfg)
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
