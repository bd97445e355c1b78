"""Write the curated images as LVD-style WebDataset shards plus a per-sample manifest.

Output (``work/shards``): ``000000.tar ...`` (``<key>.jpg|png|webp`` original bytes, ``<key>.json``
provenance, ``<key>.txt`` caption when the source had one), ``sizes.json`` (ShardWriter), and
``manifest.parquet``: one row per ingested image, kept or rejected, with the reason.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from curation.ingest import read_item_bytes
from curation.parts import Part, split_stage
from curation.store import Stage, digest, load_table, replace_dir, save_json, save_table
from curation.work import items, need, pool_table, work_dir
from dinosys.data.shard_writer import SIZES_FILE, ShardWriter

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


def shard_plan(sizes: np.ndarray, max_count: int, max_size: int) -> np.ndarray:
    """The shard of each chosen image, in id order: a new shard when the current one holds
    ``max_count`` images or would pass ``max_size`` (estimated from the ingested byte sizes plus
    tar headers). It depends on the selection only, never on the number of parts."""
    est = np.maximum(np.asarray(sizes, dtype=np.int64), 0) + 4 * 512 + 1024
    shard = np.zeros(len(est), dtype=np.int64)
    cur, count, total = 0, 0, 0
    for n, e in enumerate(est.tolist()):
        if count and (count >= max_count or total + e > max_size):
            cur, count, total = cur + 1, 0, 0
        shard[n] = cur
        count += 1
        total += e
    return shard


def _context(cfg) -> dict:
    """Everything the parts and the merge read: items, selection, groups, cluster paths."""
    work = work_dir(cfg)
    cols = items(cfg)
    sel = load_table(work / "retrieve" / "selection.parquet").to_pydict()
    clusters = load_table(work / "cluster" / "clusters.parquet").to_pydict()
    pool = pool_table(cfg)
    selection = dict(zip(sel["id"], zip(sel["selected"], sel["reason"], sel["similarity"])))
    chosen = np.array(sorted(int(i) for i, (c, _, _) in selection.items() if c), dtype=np.int64)
    pos = np.searchsorted(cols["id"], chosen)
    return {"cols": cols, "selection": selection, "chosen": chosen, "pos": pos,
            "cluster_path": dict(zip(clusters["id"], clusters["cluster_path"])),
            "group": dict(zip(pool["id"].tolist(), pool["dedup_group"].tolist())),
            "plan": shard_plan(cols["size"][pos], cfg.shards.max_count, cfg.shards.max_size)}


def _write_shard(out: Path, s: int, rows: np.ndarray, ctx: dict) -> tuple[int, dict[int, str]]:
    """Write shard ``s`` (the chosen images at ``rows``) into ``out``; returns its sample count
    and the images that could not be read."""
    cols, failed = ctx["cols"], {}
    with ShardWriter(out, max_count=max(1, len(rows)), max_size=1 << 62, start_index=s,
                     overwrite=True) as writer:
        for r in rows:
            i, p = int(ctx["chosen"][r]), int(ctx["pos"][r])
            path, member, source = str(cols["path"][p]), str(cols["member"][p]), cols["source"][p]
            try:
                data = read_item_bytes(path, member, int(cols["offset"][p]), int(cols["size"][p]))
                ext, payload = _image_field(path, member, data)
            except (OSError, ValueError) as exc:
                failed[i] = f"unreadable at shard time: {exc}"
                continue
            _, why, sim = ctx["selection"][i]
            meta = {"id": i, "source": str(source), "path": path, "member": member,
                    "sha256": str(cols["sha256"][p]), "dedup_group": int(ctx["group"].get(i, -1)),
                    "cluster_path": str(ctx["cluster_path"].get(i, "")), "selection": why,
                    "similarity": float(sim)}
            sample = {"__key__": sample_key(str(source), i), ext: payload, "json": meta}
            if cols["caption"][p]:
                sample["txt"] = str(cols["caption"][p])
            writer.write(sample)
    return sum(writer.sizes.values()), failed


def shard_key(cfg) -> str:
    """Digest of the shards: the selection and the shard limits."""
    return digest("shards", need(Stage(work_dir(cfg), "retrieve"), "retrieve"),
                  cfg.shards.max_count, cfg.shards.max_size)


def stage_shard(cfg, part: tuple[int, int] | None = None, merge: int | bool = False) -> dict:
    """Write shards + manifest.parquet + sizes.json for the selected images. Shard numbering
    comes from :func:`shard_plan`; part ``i`` of ``n`` writes shards ``s % n == i`` into its own
    folder; the merge links them into a fresh folder with the manifest, which then replaces
    ``shards/`` (shard bytes and manifest are the same whatever ``n``)."""
    work = work_dir(cfg)
    stage = Stage(work, "shards")
    key = shard_key(cfg)

    def work_part(i: int, n: int) -> dict:
        ctx = _context(cfg)
        out = Part(stage, i, n).file("shards")
        shutil.rmtree(out, ignore_errors=True)  # a killed run's shards: this part starts over
        failed: dict[int, str] = {}
        written = {}
        plan = ctx["plan"]
        n_shards = int(plan[-1]) + 1 if len(plan) else 0
        starts = np.searchsorted(plan, np.arange(n_shards + 1))
        for s in tqdm(range(i, n_shards, n), desc=f"shards {i}/{n}", unit="shard",
                      disable=not cfg.progress):
            count, bad = _write_shard(out, s, np.arange(starts[s], starts[s + 1]), ctx)
            written[s] = count
            failed.update(bad)
        return {"shards": len(written), "samples": int(sum(written.values())),
                "failed": {str(k): v for k, v in failed.items()}}

    def combine(n: int, records: list[dict]) -> dict:
        ctx = _context(cfg)
        failed = {int(k): v for r in records for k, v in r["summary"]["failed"].items()}
        reasons = _rejection_reasons(cfg)
        for i, (chosen, why, _) in ctx["selection"].items():
            if not chosen:
                reasons[int(i)] = why
        reasons.update(failed)
        tmp = stage.dir.with_name(".shards.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sizes: dict[str, int] = {}
        for p in range(n):
            src = Part(stage, p, n).file("shards")
            part_sizes = json.loads((src / SIZES_FILE).read_text()) if src.is_dir() else {}
            for name, count in part_sizes.items():
                os.link(src / name, tmp / name)  # the part's file stays until the swap
                sizes[name] = count
        sizes = dict(sorted(sizes.items()))
        save_json(tmp / SIZES_FILE, sizes)
        shard_of = {}
        for r, i in enumerate(ctx["chosen"].tolist()):
            if i not in failed:
                shard_of[i] = (f"{int(ctx['plan'][r]):06d}.tar",
                               sample_key(str(ctx["cols"]["source"][ctx["pos"][r]]), i))
        manifest = _manifest(ctx["cols"], shard_of, reasons, ctx["selection"], ctx["group"],
                             ctx["cluster_path"])
        save_table(tmp / "manifest.parquet", manifest)
        summary = {"shards": len(sizes), "samples": int(sum(sizes.values())),
                   "rejected": int(sum(1 for s in manifest["status"] if s == "rejected")),
                   "parts": n}
        Stage(tmp.parent, tmp.name).mark_done(key, summary)  # the marker arrives with the swap
        replace_dir(tmp, stage.dir)
        return summary

    return split_stage(stage, key, part, merge, work_part, combine)


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
