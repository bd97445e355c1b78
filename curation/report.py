"""``curation_report.html`` with PNG plots (matplotlib Agg): counts per stage, copy-group sizes,
the dedup threshold sweep with example pairs, cluster sizes before/after balancing, and the
composition of the selection."""

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

from curation import verify  # noqa: E402
from curation.ingest import read_item_bytes  # noqa: E402
from curation.store import Stage, digest, load_table, save_json  # noqa: E402
from curation.work import items, need, pool_table, work_dir  # noqa: E402
from dinosys.atomic import write_atomic  # noqa: E402

log = logging.getLogger(__name__)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _thumb(cols: dict, pos: dict, item_id: int, size: int = 128) -> np.ndarray:
    p = pos[item_id]
    data = read_item_bytes(str(cols["path"][p]), str(cols["member"][p]), int(cols["offset"][p]),
                           int(cols["size"][p]))
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
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


def plot_sweep(sweep: list[dict], chosen: float, out: Path) -> str:
    """Images removed as a function of the similarity threshold."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    t = [r["threshold"] for r in sweep]
    ax.plot(t, [r["removed"] for r in sweep], marker="o")
    ax.axvline(chosen, color="tab:red", ls="--", label=f"threshold {chosen}")
    ax.set_xlabel("cosine threshold")
    ax.set_ylabel("images removed as copies")
    ax.legend()
    ax.set_title("dedup threshold sweep")
    return _save(fig, out)


def plot_pairs(pairs: list[tuple[int, int, str]], cols: dict, title: str, out: Path) -> str:
    """One row per ``(item id, item id, label)``: the two thumbnails side by side."""
    pos = {int(i): p for p, i in enumerate(cols["id"])}
    fig, axes = plt.subplots(len(pairs), 2, figsize=(4, 2 * len(pairs)), squeeze=False)
    for (a, b), (i, j, label) in zip(axes, pairs):
        for ax, item in ((a, i), (b, j)):
            try:
                ax.imshow(_thumb(cols, pos, int(item)))
            except (OSError, ValueError):
                ax.text(0.5, 0.5, "unreadable", ha="center")
            ax.set_xticks([])
            ax.set_yticks([])
        a.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, out)


def plot_examples(sweep: list[dict], cols: dict, out: Path) -> str | None:
    """For each threshold, the least similar pair still above it (what that threshold merges)."""
    pairs = [(i, j, f"> {r['threshold']:.2f}\nsim {s:.3f}")
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
    pairs = [(int(ei[e]), int(ej[e]), f"{what}\ncos {sim[e]:.2f}\ncorr {corr[e]:.2f}")
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
    """Selected images by source and selection reason (stacked bars)."""
    src_names = sorted(set(sources)) or ["(none)"]
    why_names = sorted(set(reasons)) or ["(none)"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    left = np.zeros(len(src_names))
    for why in why_names:
        vals = np.array([sum(1 for s, r in zip(sources, reasons) if s == name and r == why)
                         for name in src_names], dtype=float)
        ax.barh(src_names, vals, left=left, label=why)
        left += vals
    ax.set_xlabel("selected images")
    ax.legend(fontsize=8)
    ax.set_title("selection by source and reason")
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
    plots = {"counts": plot_counts(counts, out / "counts.png"),
             "components": plot_components(np.bincount(pool["dedup_group"]) if len(pool["id"])
                                           else np.zeros(0, int), out / "components.png"),
             "sweep": plot_sweep(sweep, cfg.dedup.threshold, out / "sweep.png")}
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
    plots["composition"] = plot_composition(
        np.asarray(manifest["source"])[kept].tolist(),
        np.asarray(manifest["selection_reason"])[kept].tolist(), out / "composition.png")
    summaries = {name: Stage(work, name).summary()
                 for name in ("ingest", "embed", "embed_copy", "dedup", "cluster", "retrieve",
                              "shards") if Stage(work, name).marker.is_file()}
    _write_html(shard_dir / "curation_report.html", cfg, counts, summaries, sweep, plots)
    summary = {"report": str(shard_dir / "curation_report.html"), "plots": sorted(plots.values())}
    save_json(stage.dir / "summary.json", {"counts": counts, **summary})
    stage.mark_done(key, summary)
    return summary


def _write_html(path: Path, cfg, counts: dict, summaries: dict, sweep: list, plots: dict) -> None:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in counts.items())
    stages = "".join(f"<tr><td>{esc(k)}</td><td><code>{esc(json.dumps(v, sort_keys=True))}"
                     f"</code></td></tr>" for k, v in summaries.items())
    sw = "".join(f"<tr><td>{r['threshold']:.2f}</td><td>{r['edges']}</td><td>{r['removed']}</td>"
                 f"</tr>" for r in sweep)
    imgs = "".join(f'<h3>{esc(k)}</h3><img src="report/{esc(v)}" alt="{esc(k)}">'
                   for k, v in plots.items())
    copy = ("" if cfg.copy_embed is None else
            f"; copy model for dedup <code>{esc(cfg.copy_embed.model)}</code>")
    text = f"""<!doctype html><html><head><meta charset="utf-8">
<title>curation report: {esc(cfg.name)}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:auto}}td{{padding:2px 8px}}
img{{max-width:100%}}</style></head><body>
<h1>Curation report: {esc(cfg.name)}</h1>
<p>model <code>{esc(cfg.embed.model)}</code>, features {esc(cfg.embed.features)} x
{cfg.embed.n_layers} layer(s){copy}; dedup threshold {cfg.dedup.threshold}, decontamination
{cfg.dedup.decontam_threshold}, k={cfg.dedup.k}; geometric verification
{"on" if cfg.dedup.verify.enabled else "off"}.</p>
<h2>Images per stage</h2><table>{rows}</table>
<h2>Threshold sweep</h2><table><tr><th>threshold</th><th>edges</th><th>removed</th></tr>{sw}</table>
<h2>Plots</h2>{imgs}
<h2>Stage summaries</h2><table>{stages}</table>
</body></html>
"""
    write_atomic(path, text)
