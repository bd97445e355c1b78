"""Write the curated images as LVD-style WebDataset shards plus a per-sample manifest.

Output (``work/shards``): ``000000.tar ...`` (``<key>.jpg|png|webp`` original bytes, ``<key>.json``
provenance, ``<key>.txt`` caption when the source had one), ``sizes.json`` (ShardWriter), and
``manifest.parquet``: one row per ingested image, kept or rejected, with the reason.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from curation.ingest import read_item_bytes
from curation.pipeline import _need, items, pool_table, work_dir
from curation.store import Stage, digest, load_table, replace_dir, save_table
from dinosys.data.shard_writer import ShardWriter

log = logging.getLogger(__name__)
KEEP_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(source: str, item_id: int) -> str:
    """A WebDataset key without dots or slashes: ``<source>-<id>``."""
    return f"{_KEY_BAD.sub('_', source).lstrip('_') or 'src'}-{item_id:09d}"


def _image_field(path: str, member: str, data: bytes) -> tuple[str, bytes]:
    """Keep jpg/png/webp bytes as they are; re-encode other formats losslessly as PNG."""
    ext = KEEP_EXT.get(Path(member or path).suffix.lower())
    if ext is not None:
        return ext, data
    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
    return "png", buf.getvalue()


def _rejection_reasons(cfg) -> dict[int, str]:
    """Why each rejected image was rejected (by id)."""
    work = work_dir(cfg)
    cols = items(cfg)
    reasons: dict[int, str] = {}
    for i, status, reason in zip(cols["id"], cols["status"], cols["reason"]):
        if status != "ok":
            reasons[int(i)] = f"{status}: {reason}" if reason else str(status)
    fail = load_table(work / "embed" / "failures.parquet").to_pydict()
    for i, reason in zip(fail["id"], fail["reason"]):
        reasons[int(i)] = f"unreadable: {reason}"
    pool = pool_table(cfg)
    for i, rep, sim, con, match, esim, keep in zip(pool["id"], pool["rep_id"], pool["dedup_sim"],
                                                   pool["contaminated"], pool["eval_match"],
                                                   pool["eval_sim"], pool["keep"]):
        if con:
            near = f" (eval id {match}" + (f", similarity {esim:.3f})" if esim > 0 else ")")
            reasons[int(i)] = "eval_contamination" + near
        elif not keep:
            reasons[int(i)] = f"near_duplicate of id {rep} (similarity {sim:.3f})"
    return reasons


def stage_shard(cfg) -> dict:
    """Write shards + manifest.parquet + sizes.json for the selected images (atomic directory)."""
    work = work_dir(cfg)
    stage = Stage(work, "shards")
    key = digest("shards", _need(Stage(work, "retrieve"), "retrieve"), cfg.shards.max_count,
                 cfg.shards.max_size)
    if stage.is_done(key):
        return stage.summary()
    cols = items(cfg)
    pos = {int(i): p for p, i in enumerate(cols["id"])}
    sel = load_table(work / "retrieve" / "selection.parquet").to_pydict()
    clusters = load_table(work / "cluster" / "clusters.parquet").to_pydict()
    cluster_path = dict(zip(clusters["id"], clusters["cluster_path"]))
    pool = pool_table(cfg)
    group = dict(zip(pool["id"].tolist(), pool["dedup_group"].tolist()))
    reasons = _rejection_reasons(cfg)
    selection = dict(zip(sel["id"], zip(sel["selected"], sel["reason"], sel["similarity"])))
    for i, (chosen, why, _) in selection.items():
        if not chosen:
            reasons[int(i)] = why
    tmp = stage.dir.with_name(".shards.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shard_of: dict[int, tuple[str, str]] = {}
    chosen_ids = sorted(int(i) for i, (c, _, _) in selection.items() if c)
    with ShardWriter(tmp, max_count=cfg.shards.max_count, max_size=cfg.shards.max_size) as writer:
        for i in tqdm(chosen_ids, desc="shards", unit="img", disable=not cfg.progress):
            p = pos[i]
            path, member, source = str(cols["path"][p]), str(cols["member"][p]), cols["source"][p]
            try:
                data = read_item_bytes(path, member, int(cols["offset"][p]), int(cols["size"][p]))
                ext, payload = _image_field(path, member, data)
            except (OSError, ValueError) as exc:
                reasons[i] = f"unreadable at shard time: {exc}"
                continue
            k = sample_key(str(source), i)
            _, why, sim = selection[i]
            meta = {"id": i, "source": str(source), "path": path, "member": member,
                    "sha256": str(cols["sha256"][p]), "dedup_group": int(group.get(i, -1)),
                    "cluster_path": str(cluster_path.get(i, "")), "selection": why,
                    "similarity": float(sim)}
            sample = {"__key__": k, ext: payload, "json": meta}
            if cols["caption"][p]:
                sample["txt"] = str(cols["caption"][p])
            writer.write(sample)
            # the sample went into the open shard, numbered after the completed ones
            shard_of[i] = (writer.shard_name(len(writer.sizes)), k)
    sizes = writer.sizes
    manifest = _manifest(cols, shard_of, reasons, selection, group, cluster_path)
    save_table(tmp / "manifest.parquet", manifest)
    replace_dir(tmp, stage.dir)
    summary = {"shards": len(sizes), "samples": int(sum(sizes.values())),
               "rejected": int(sum(1 for s in manifest["status"] if s == "rejected"))}
    stage.mark_done(key, summary)
    return summary


def _manifest(cols, shard_of, reasons, selection, group, cluster_path) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in (
        "id", "role", "source", "path", "member", "sha256", "status", "reason", "dedup_group",
        "cluster_path", "selection_reason", "similarity", "shard", "key")}
    for p, i in enumerate(cols["id"].tolist()):
        shard, key = shard_of.get(i, ("", ""))
        role = str(cols["role"][p])
        kept = bool(shard)
        chosen = selection.get(i)
        out["id"].append(i)
        out["role"].append(role)
        out["source"].append(str(cols["source"][p]))
        out["path"].append(str(cols["path"][p]))
        out["member"].append(str(cols["member"][p]))
        out["sha256"].append(str(cols["sha256"][p]))
        out["status"].append("kept" if kept else ("rejected" if role == "pool" else role))
        out["reason"].append("" if kept else reasons.get(i, "" if role != "pool" else "dropped"))
        out["dedup_group"].append(int(group.get(i, -1)))
        out["cluster_path"].append(str(cluster_path.get(i, "")))
        out["selection_reason"].append(chosen[1] if chosen else "")
        out["similarity"].append(float(chosen[2]) if chosen else 0.0)
        out["shard"].append(shard)
        out["key"].append(key)
    return out


def manifest_counts(manifest_path: Path) -> dict[str, int]:
    """Counts of manifest reasons' first word (report, tests)."""
    t = load_table(manifest_path).to_pydict()
    words = [r.split(":")[0].split(" ")[0] if r else s for s, r in zip(t["status"], t["reason"])]
    vals, counts = np.unique(np.asarray(words, dtype=str), return_counts=True)
    return {str(v): int(c) for v, c in zip(vals, counts)}
