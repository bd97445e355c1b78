"""The numbers of ``curation_report.html`` as tables a person can read: the dedup decision
(candidates, verified removals and the chosen threshold together), the threshold sweep with the
embedding-only removals (and recall / precision when the pool has a planted-copy list), the
composition of the selection, and each stage's summary."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from curation import dedup as dd

PLANTED_LIST = "planted.json"  # beside a pool folder's images: file names of planted copies


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return format(value, ",.6g")
    if value is None:
        return "-"
    return html.escape(str(value))


def table(header: list[str], rows: list[list[Any]], marked: set[int] = frozenset()) -> str:
    """An HTML table; rows whose index is in ``marked`` are bold."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr{}>{}</tr>".format(' class="chosen"' if r in marked else "",
                               "".join(f"<td>{_cell(v)}</td>" for v in row))
        for r, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def planted_copies(sources: list, manifest: dict) -> set[str] | None:
    """Planted copies of the pool, by manifest path, when a pool folder holds ``planted.json``
    (written by ``dinosys-curate demo-pool``); None when no source has one."""
    planted: set[str] = set()
    found = False
    for source in sources:
        listing = Path(source.path) / PLANTED_LIST
        if not listing.is_file():
            continue
        found = True
        names = set(json.loads(listing.read_text()))
        planted |= {str(Path(source.path) / n) for n in names}
    if not found:
        return None
    paths = set(np.asarray(manifest["path"], dtype=str).tolist())
    return planted & paths


def recall_precision(removed: set[str], planted: set[str]) -> tuple[float, float]:
    """Share of the planted copies removed, share of the removed images that are planted."""
    hit = len(removed & planted)
    return round(hit / max(1, len(planted)), 3), round(hit / max(1, len(removed)), 3)


def embedding_only_removals(work: Path, thresholds: list[float], priority: np.ndarray | None,
                            spill: int | None) -> dict[float, set[int]]:
    """Pool item ids an embedding threshold alone would remove as copies, per threshold (the
    dedup stage's own components and representatives, without verification)."""
    d = work / "dedup"
    pool_ids = np.load(work / "knn" / "pool_ids.npy")
    order = np.argsort(pool_ids)
    ids_sorted = pool_ids[order]

    def positions(ids: np.ndarray) -> np.ndarray:
        return order[np.searchsorted(ids_sorted, ids)]

    edges = dd.Edges(positions(np.load(d / "edges_i.npy")), positions(np.load(d / "edges_j.npy")),
                     np.load(d / "edges_sim.npy"))
    out = {}
    for t in thresholds:
        result = dd.dedup(len(pool_ids), edges, t, priority, spill)
        out[t] = set(pool_ids[~result.keep].tolist())
    return out


def decision_html(cfg, dedup_summary: dict, alone: int, removed_verified: int,
                  quality: dict | None) -> str:
    """The chosen threshold with what it proposed (``alone``: what the embedding alone would
    remove there) and what was removed, in one table."""
    t = cfg.dedup.threshold
    rows = [["chosen cosine threshold", t],
            ["candidate pairs above it (embedding)", dedup_summary.get("edges")]]
    if cfg.dedup.verify.enabled:
        rows += [["pairs confirmed by geometric verification",
                  dedup_summary.get("verify_confirmed")],
                 ["pairs rejected by geometric verification", dedup_summary.get("verify_rejected")],
                 ["pairs accepted without checking (accept_above)",
                  dedup_summary.get("verify_accepted_unchecked")]]
    rows.append(["images the embedding alone would remove at this threshold", alone])
    rows.append(["images removed as near-duplicates (this run)", removed_verified])
    rows.append(["images removed by decontamination", dedup_summary.get("contaminated")])
    if quality is not None:
        rows += [["planted copies in the pool", quality["planted"]],
                 ["recall of the planted copies (this run)", quality["recall"]],
                 ["precision on the whole pool (this run)", quality["precision"]]]
    note = ("" if cfg.dedup.verify.enabled else
            "<p>Geometric verification is off: every pair above the threshold joins a copy "
            "group.</p>")
    return table(["dedup", "value"], rows) + note


def sweep_html(sweep: list[dict], chosen: float, verified_removed: int, verify_on: bool,
               quality_rows: dict[float, tuple[float, float]] | None) -> str:
    """Threshold sweep: candidate pairs and embedding-only removals per threshold; the chosen
    threshold's row also shows what this run removed (after verification when it is on)."""
    header = ["threshold", "candidate pairs", "removed by the embedding alone"]
    if quality_rows is not None:
        header += ["recall (embedding alone)", "precision (embedding alone)"]
    header.append("removed by this run" + (" (after verification)" if verify_on else ""))
    rows, marked = [], set()
    for r in sweep:
        row = [r["threshold"], r["edges"], r["removed"]]
        if quality_rows is not None:
            row += list(quality_rows[r["threshold"]])
        is_chosen = abs(r["threshold"] - chosen) < 1e-9
        row.append(verified_removed if is_chosen else None)
        if is_chosen:
            marked.add(len(rows))
        rows.append(row)
    return table(header, rows, marked)


def composition_html(sources: list[str], reasons: list[str]) -> str:
    """Selected images by source and selection reason, with shares of the selection."""
    total = len(sources)
    src_names = sorted(set(sources))
    why_names = sorted(set(reasons))
    rows = []
    for name in src_names:
        counts = [sum(1 for s, r in zip(sources, reasons) if s == name and r == why)
                  for why in why_names]
        n = sum(counts)
        rows.append([name, *counts, n, f"{100 * n / max(1, total):.1f}%"])
    rows.append(["all sources", *[reasons.count(w) for w in why_names], total, "100%"
                 if total else "-"])
    return table(["source", *why_names, "selected", "share"], rows, {len(rows) - 1})


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        elif isinstance(v, list):
            out.append((key, ", ".join(str(x) for x in v)))
        else:
            out.append((key, v))
    return out


def summaries_html(summaries: dict[str, dict]) -> str:
    """One small table per stage (nested summaries flattened to dotted keys)."""
    parts = []
    for stage, summary in summaries.items():
        rows = [[k.replace("_", " "), v] for k, v in _flatten(summary)]
        parts.append(f"<h3>{html.escape(stage)}</h3>" + table(["", "value"], rows))
    return "".join(parts)
