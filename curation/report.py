"""``curation_report.html``: tables (images per stage; the dedup decision: candidates, verified
removals and the chosen threshold together; the threshold sweep, with recall and precision when
a pool folder lists its planted copies in ``planted.json``; the selection by source and reason;
each stage's summary) and PNG plots (matplotlib Agg): counts per stage, copy-group sizes, the
sweep, example pairs big enough to see, verification examples, cluster sizes before/after
balancing, the selection."""

from __future__ import annotations

import html
import io
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from curation import report_tables as tables  # noqa: E402
from curation import verify  # noqa: E402
from curation.ingest import read_item_bytes  # noqa: E402
from curation.store import Stage, digest, load_table, save_json  # noqa: E402
from curation.work import dedup_embed_stage, items, need, pool_table, work_dir  # noqa: E402
from dinosys.atomic import write_atomic  # noqa: E402

log = logging.getLogger(__name__)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _thumb(cols: dict, pos: dict, item_id: int, size: int = 256) -> np.ndarray:
    p = pos[item_id]
    data = read_item_bytes(str(cols["path"][p]), str(cols["member"][p]), int(cols["offset"][p]),
                           int(cols["size"][p]))
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if max(img.size) < size:  # small images are shown big enough to see (nearest: no blur)
            scale = size / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.NEAREST)
        img.thumbnail((size, size))
        return np.asarray(img)


def plot_counts(counts: dict[str, int], out: Path) -> str:
    """Bar chart of images remaining / removed per stage."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names, values = list(counts), list(counts.values())
    bars = ax.barh(names[::-1], values[::-1], color="tab:blue")
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("images")
    ax.set_title("images per curation stage")
    return _save(fig, out)


def plot_components(sizes: np.ndarray, out: Path) -> str:
    """Histogram of copy-group sizes (groups of two or more)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    multi = sizes[sizes > 1]
    if len(multi):
        bins = np.arange(2, multi.max() + 2) - 0.5 if multi.max() < 40 else 40
        ax.hist(multi, bins=bins, color="tab:orange", log=True)
    ax.set_xlabel("images per copy group")
    ax.set_ylabel("groups")
    ax.set_title(f"near-duplicate groups ({len(multi)} with 2+ images)")
    return _save(fig, out)


def plot_sweep(sweep: list[dict], chosen: float, out: Path,
               removed_by_run: int | None = None) -> str:
    """Images the embedding alone removes per similarity threshold, and what this run removed
    at the chosen threshold (after geometric verification when it is on)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    t = [r["threshold"] for r in sweep]
    ax.plot(t, [r["removed"] for r in sweep], marker="o", label="removed by the embedding alone")
    ax.axvline(chosen, color="tab:red", ls="--", label=f"chosen threshold {chosen}")
    if removed_by_run is not None:
        ax.plot([chosen], [removed_by_run], marker="*", ms=14, color="tab:green", ls="none",
                label=f"removed by this run: {removed_by_run}")
    ax.set_xlabel("cosine threshold")
    ax.set_ylabel("images removed as copies")
    ax.legend()
    ax.set_title("dedup threshold sweep")
    return _save(fig, out)


def plot_pairs(pairs: list[tuple[int, int, str]], cols: dict, title: str, out: Path) -> str:
    """One row per ``(item id, item id, label)``: the two images side by side, big enough to
    see, with the label written above the pair."""
    pos = {int(i): p for p, i in enumerate(cols["id"])}
    fig, axes = plt.subplots(len(pairs), 2, figsize=(9, 4.4 * len(pairs)), squeeze=False)
    for (a, b), (i, j, label) in zip(axes, pairs):
        for ax, item in ((a, i), (b, j)):
            try:
                ax.imshow(_thumb(cols, pos, int(item)))
            except (OSError, ValueError):
                ax.text(0.5, 0.5, "unreadable", ha="center")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"item {int(item)}: {Path(str(cols['path'][pos[int(item)]])).name}",
                          fontsize=10)
        a.set_title(label, fontsize=12, loc="left")
    log.debug("%s: %s", out.name, title)  # the report's caption says what the pairs are
    return _save(fig, out)


def plot_examples(sweep: list[dict], cols: dict, out: Path) -> str | None:
    """For each threshold, the least similar pair still above it (what that threshold merges)."""
    pairs = [(i, j, f"threshold {r['threshold']:.2f}: least similar pair above it, cos {s:.3f}")
             for r in sweep if r["example"] is not None for i, j, s in [r["example"]]]
    if not pairs:
        return None
    return plot_pairs(pairs, cols, "least similar pair above each threshold", out)


def plot_verification(work: Path, cols: dict, out: Path, n: int = 4) -> str | None:
    """Candidate pairs that geometric verification decided: the most similar rejected pairs (what
    the embedding threshold alone would have merged) and the least correlated confirmed ones."""
    d = work / "dedup"
    status = np.load(d / "edges_verified.npy")
    sim, corr = np.load(d / "edges_sim.npy"), np.load(d / "edges_correlation.npy")
    ei, ej = np.load(d / "edges_i.npy"), np.load(d / "edges_j.npy")
    rejected = np.flatnonzero(status == verify.REJECTED)
    confirmed = np.flatnonzero(verify.is_confirmed(status))
    picks = ([("rejected", e) for e in rejected[np.argsort(-sim[rejected])][:n]]
             + [("confirmed", e) for e in confirmed[np.argsort(corr[confirmed])][:n]])
    if not picks:
        return None
    pairs = [(int(ei[e]), int(ej[e]), f"{what}: cos {sim[e]:.2f}, correlation {corr[e]:.2f}")
             for what, e in picks]
    return plot_pairs(pairs, cols, "verification: most similar rejected, least correlated "
                      "confirmed", out)


def plot_clusters(before: np.ndarray, after: np.ndarray, out: Path) -> str:
    """Finest-level cluster sizes of the candidates and of the final selection."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max(int(before.max()) if len(before) else 1, 1)
    bins = np.linspace(0, top + 1, 31)
    ax.hist(before, bins=bins, alpha=0.6, label="before balancing")
    ax.hist(after, bins=bins, alpha=0.6, label="after balancing / selection")
    ax.set_xlabel("images per finest cluster")
    ax.set_ylabel("clusters")
    ax.legend()
    ax.set_title("cluster sizes")
    return _save(fig, out)


def plot_composition(sources: list[str], reasons: list[str], out: Path) -> str:
    """Selected images per source, one bar per (source, selection reason), count written on
    each bar (the table beside it has the same numbers)."""
    combos = sorted(set(zip(sources, reasons)))
    counts = [sum(1 for s, r in zip(sources, reasons) if (s, r) == c) for c in combos]
    labels = [f"{s} / {r}" for s, r in combos] or ["(nothing selected)"]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(labels) + 1.5))
    bars = ax.barh(labels[::-1], (counts or [0])[::-1], color="tab:green")
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("selected images")
    ax.set_title("selection by source / reason")
    return _save(fig, out)


def stage_report(cfg) -> dict:
    """Write ``shards/curation_report.html`` and its PNGs under ``shards/report/``."""
    work = work_dir(cfg)
    stage = Stage(work, "report")
    key = digest("report", need(Stage(work, "shards"), "shard"))
    if stage.is_done(key):
        return stage.summary()
    shard_dir = work / "shards"
    out = shard_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    cols = items(cfg)
    manifest = load_table(shard_dir / "manifest.parquet").to_pydict()
    pool = pool_table(cfg)
    sweep = json.loads((work / "dedup" / "sweep.json").read_text())
    clusters = load_table(work / "cluster" / "clusters.parquet").to_pydict()
    sel = load_table(work / "retrieve" / "selection.parquet").to_pydict()
    is_pool = np.asarray(manifest["role"]) == "pool"
    reasons = np.asarray(manifest["reason"], dtype=str)[is_pool]
    first = np.array([r.split(":")[0].split(" ")[0] for r in reasons], dtype=str)
    n_pool = int(is_pool.sum())
    counts = {"ingested (pool)": n_pool}
    left = n_pool
    for label, code in (("after exact dedup", "exact_duplicate"), ("after decode", "unreadable"),
                        ("after decontamination", "eval_contamination"),
                        ("after near-dup removal", "near_duplicate")):
        left -= int((first == code).sum())
        counts[label] = left
    counts["kept in shards"] = int((np.asarray(manifest["status"]) == "kept").sum())
    dedup_summary = Stage(work, "dedup").summary()
    removed_by_run = int(np.char.startswith(reasons, "near_duplicate").sum())
    priority = _representative_priority(cfg, work)
    alone = tables.embedding_only_removals(
        work, sorted({r["threshold"] for r in sweep} | {cfg.dedup.threshold}), priority,
        cfg.dedup.spill_edges)
    quality, quality_rows = _planted_quality(cfg, manifest, alone)
    if not any(abs(r["threshold"] - cfg.dedup.threshold) < 1e-9 for r in sweep):
        # the chosen threshold gets its own sweep row, so candidates, embedding-only removals
        # and this run's removals stand side by side
        sweep = sorted([*sweep, {"threshold": cfg.dedup.threshold, "example": None,
                                 "edges": dedup_summary.get("edges"),
                                 "removed": len(alone[cfg.dedup.threshold])}],
                       key=lambda r: r["threshold"])
    plots = {"counts": plot_counts(counts, out / "counts.png"),
             "components": plot_components(np.bincount(pool["dedup_group"]) if len(pool["id"])
                                           else np.zeros(0, int), out / "components.png"),
             "sweep": plot_sweep(sweep, cfg.dedup.threshold, out / "sweep.png", removed_by_run)}
    examples = plot_examples(sweep, cols, out / "sweep_examples.png")
    if examples:
        plots["examples"] = examples
    verification = plot_verification(work, cols, out / "verification.png")
    if verification:
        plots["verification"] = verification
    lab = np.asarray(clusters["cluster"])
    chosen = np.isin(np.asarray(clusters["id"]), np.asarray(sel["id"])[np.asarray(sel["selected"])])
    n_c = int(lab.max()) + 1 if len(lab) else 0
    plots["clusters"] = plot_clusters(np.bincount(lab, minlength=n_c),
                                      np.bincount(lab[chosen], minlength=n_c), out / "clusters.png")
    kept = np.asarray(manifest["status"]) == "kept"
    kept_sources = np.asarray(manifest["source"])[kept].tolist()
    kept_reasons = np.asarray(manifest["selection_reason"])[kept].tolist()
    plots["composition"] = plot_composition(kept_sources, kept_reasons, out / "composition.png")
    summaries = {name: Stage(work, name).summary()
                 for name in ("ingest", "embed", "embed_copy", "dedup", "cluster", "retrieve",
                              "shards") if Stage(work, name).marker.is_file()}
    sections = {
        "decision": tables.decision_html(cfg, dedup_summary, len(alone[cfg.dedup.threshold]),
                                         removed_by_run, quality),
        "sweep": tables.sweep_html(sweep, cfg.dedup.threshold, removed_by_run,
                                   cfg.dedup.verify.enabled, quality_rows),
        "composition": tables.composition_html(kept_sources, kept_reasons),
        "summaries": tables.summaries_html(summaries)}
    _write_html(shard_dir / "curation_report.html", cfg, counts, sections, plots)
    summary = {"report": str(shard_dir / "curation_report.html"), "plots": sorted(plots.values()),
               "removed_near_duplicates": removed_by_run}
    if quality is not None:
        summary["planted_quality"] = quality
    save_json(stage.dir / "summary.json", {"counts": counts, **summary})
    stage.mark_done(key, summary)
    return summary


def _planted_quality(cfg, manifest: dict, alone: dict[float, set[int]]
                     ) -> tuple[dict | None, dict[float, tuple[float, float]] | None]:
    """Recall / precision of this run's near-duplicate removals and of the embedding threshold
    alone at every sweep threshold, when a pool folder lists its planted copies."""
    planted = tables.planted_copies(cfg.sources, manifest)
    if planted is None:
        return None, None
    paths = np.asarray(manifest["path"], dtype=str)
    reasons = np.asarray(manifest["reason"], dtype=str)
    removed = set(paths[np.char.startswith(reasons, "near_duplicate")].tolist())
    recall, precision = tables.recall_precision(removed, planted)
    quality = {"planted": len(planted), "removed": len(removed), "recall": round(recall, 4),
               "precision": round(precision, 4)}
    path_of = dict(zip(np.asarray(manifest["id"]).tolist(), paths.tolist()))
    rows = {t: tables.recall_precision({path_of[i] for i in ids}, planted)
            for t, ids in alone.items()}
    return quality, rows


def _representative_priority(cfg, work: Path) -> np.ndarray | None:
    """The dedup stage's representative priority (image area with ``representative:
    largest``), so the embedding-only removals pick the same representatives."""
    if cfg.dedup.representative != "largest":
        return None
    dec = load_table(work / dedup_embed_stage(cfg) / "decoded.parquet").to_pydict()
    area = dict(zip(dec["id"], np.asarray(dec["width"]) * np.asarray(dec["height"])))
    pool_ids = np.load(work / "knn" / "pool_ids.npy")
    return np.array([area.get(int(i), 0) for i in pool_ids], dtype=np.float64)


def _write_html(path: Path, cfg, counts: dict, sections: dict[str, str], plots: dict) -> None:
    esc = html.escape
    rows = tables.table(["stage", "images"], [[k, v] for k, v in counts.items()])
    captions = {"counts": "Images per stage", "components": "Copy-group sizes",
                "sweep": "Threshold sweep",
                "examples": "What each threshold merges: the least similar pair above it",
                "verification": "Geometric verification: the most similar rejected pairs and "
                "the least correlated confirmed ones", "clusters": "Cluster sizes",
                "composition": "Selection by source and reason"}
    imgs = "".join(f'<h3>{esc(captions.get(k, k))}</h3><img src="report/{esc(v)}" alt="{esc(k)}">'
                   for k, v in plots.items())
    copy = ("" if cfg.copy_embed is None else
            f"; copy model for dedup <code>{esc(cfg.copy_embed.model)}</code>")
    text = f"""<!doctype html><html><head><meta charset="utf-8">
<title>curation report: {esc(cfg.name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}
td,th{{padding:3px 10px;text-align:left}}td{{font-variant-numeric:tabular-nums}}
table{{border-collapse:collapse;margin-bottom:1em}}tr:nth-child(even){{background:#f3f3f3}}
tr.chosen{{font-weight:bold;background:#ffe9b3}}img{{max-width:100%}}</style></head><body>
<h1>Curation report: {esc(cfg.name)}</h1>
<p>model <code>{esc(cfg.embed.model)}</code>, features {esc(cfg.embed.features)} x
{cfg.embed.n_layers} layer(s){copy}; dedup threshold {cfg.dedup.threshold}, decontamination
{cfg.dedup.decontam_threshold}, k={cfg.dedup.k}; geometric verification
{"on" if cfg.dedup.verify.enabled else "off"}.</p>
<h2>Images per stage</h2>{rows}
<h2>Dedup: what the chosen threshold proposed and what was removed</h2>{sections["decision"]}
<h2>Threshold sweep</h2>
<p>"removed by the embedding alone": images that would leave as copies if every pair above the
threshold were merged. The highlighted row is the chosen threshold; its last column is what this
run removed{" after geometric verification" if cfg.dedup.verify.enabled else ""}.</p>
{sections["sweep"]}
<h2>Selection by source and reason</h2>{sections["composition"]}
<h2>Plots</h2>{imgs}
<h2>Stage summaries</h2>{sections["summaries"]}
</body></html>
"""
    write_atomic(path, text)
