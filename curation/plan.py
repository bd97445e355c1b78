"""`dinosys-curate plan`: predicted wall-clock and GPU-hours per stage for N images on K GPUs.

Every stage's cost is a count of work (images, dot products, pairs, megabytes) divided by a
rate measured on real hardware; ``curation/assets/rates.json`` stores each rate with where,
when and with which command it was measured, and the runs the model is checked against
(``tests/curation/test_plan.py``). The work counts follow what the code does: the kNN graph is
IVF-Flat (route every query to ``nlist`` centroids, scan ``nprobe`` lists), built once by one
node (k-means training and routing: dense products, their own rate), searched by every part
(the list scans: the kNN rate); k-means trains on a sample and assigns every kept image;
retrieval is an exact top-k of every query over the kept images. The GPU-hours of a stage are
its wall-clock times K: the arrays hold every GPU node for each stage. Rates per CPU core are
in CPU-seconds (what a shared or a quiet machine both give).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dinosys.errors import UserError

RATES_FILE = Path(__file__).resolve().parent / "assets" / "rates.json"


def load_rates(path: str | Path | None = None) -> dict:
    """The rates table (the shipped one, or a JSON file with the same keys)."""
    p = Path(path) if path else RATES_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the rates file {p}: {exc}") from None


def _rate(rates: dict, name: str) -> float:
    return float(rates["rates"][name]["value"])


def knn_dots(n: int, queries: int, nlist: int, nprobe: int) -> float:
    """256-d dot products of the list-wise IVF-Flat search: routing plus the probed lists."""
    return queries * (nlist + nprobe * n / max(1, nlist))


def index_dots(n: int, nlist: int, train_iters: int = 10) -> float:
    """Dot products of building the shared index: training on 39 points per list, then
    routing every pool vector to its list."""
    return min(n, 39 * nlist) * nlist * train_iters + n * nlist


def stage_costs(images: float, gpus: int, rates: dict, a: dict) -> list[dict]:
    """Per stage: CPU-seconds or GPU-seconds of work, the resources it runs on, wall hours."""
    n = int(images)
    dim_scale = a["dim"] / 256
    cores = gpus * a["cores_per_gpu"]
    node_cores = a["gpus_per_node"] * a["cores_per_gpu"]
    nlist = a["nlist"] or int(max(1, min(2 * math.sqrt(n), n // 39)))
    kept = n * a["kept_after_dedup"]
    selected = n * a["selected_fraction"]
    knn_rate = _rate(rates, "knn_dots_per_core_s") / dim_scale
    index_rate = _rate(rates, "index_dots_per_core_s") / dim_scale
    km_rate = _rate(rates, "kmeans_dots_per_core_s") / dim_scale
    gpu_embed = rates["rates"]["embed_images_per_gpu_s"]["value"].get(a["backbone"])
    if gpu_embed is None:
        known = sorted(rates["rates"]["embed_images_per_gpu_s"]["value"])
        raise UserError(f"--backbone {a['backbone']}: no embedding rate in the rates file; "
                        f"one of {', '.join(known)}")
    embed_rate = min(gpu_embed, a["cores_per_gpu"] * _rate(rates, "decode_images_per_core_s"))
    k0 = a["clusters"]
    train = min(kept, a["kmeans_train_points"])
    rows = [
        ("ingest", n / _rate(rates, "ingest_images_per_core_s"), cores,
         f"{n:.3g} images / ingest rate"),
        ("embed", n / embed_rate, gpus,
         f"{n:.3g} images / min(GPU rate, {a['cores_per_gpu']} cores x decode rate) "
         f"= {embed_rate:.0f} img/s per GPU"),
        ("index", index_dots(n, nlist) / index_rate, node_cores,
         f"one node trains {nlist} lists and routes {n:.3g} vectors"),
        ("knn", knn_dots(n, n, nlist, a["nprobe"]) / knn_rate, cores,
         f"{n:.3g} queries x ({nlist} centroids + {a['nprobe']} lists of {n / nlist:.0f})"),
        ("verify", n * a["candidate_pairs_per_image"] / _rate(rates, "verify_pairs_per_core_s"),
         cores, f"{a['candidate_pairs_per_image']} candidate pairs per image"),
        ("dedup merge", n / _rate(rates, "dedup_merge_images_per_s"), 1,
         "one process: edges merged, connected components, decontamination"),
        ("cluster", (train * k0 * a["kmeans_iters"] * (1 + a["kmeans_resample"])
                     + kept * k0) / km_rate, cores,
         f"k-means {k0} clusters on {train:.3g} points x {a['kmeans_iters']} iterations x "
         f"{1 + a['kmeans_resample']} (resampling), then {kept:.3g} kept images assigned"),
        ("retrieve", a["queries"] * kept / km_rate, cores,
         f"exact top-k of {a['queries']:.3g} queries over {kept:.3g} kept images"),
        ("shard", selected * a["image_kb"] / 1000 / _rate(rates, "shard_mb_per_core_s"), cores,
         f"{selected:.3g} selected images x {a['image_kb']} KB"),
    ]
    out = []
    for stage, work, workers, basis in rows:
        wall = work / workers
        out.append({"stage": stage, "wall_hours": wall / 3600, "gpu_hours": wall * gpus / 3600,
                    "work_seconds": work, "parallel": workers, "basis": basis})
    return out


DEFAULTS = {
    "backbone": "vitl14", "dim": 256, "cores_per_gpu": 12, "gpus_per_node": 8, "nlist": None,
    "nprobe": 16, "candidate_pairs_per_image": 1.0, "kept_after_dedup": 0.8,
    "selected_fraction": 142 / 1200, "clusters": 100_000, "kmeans_train_points": 10_000_000,
    "kmeans_iters": 20, "kmeans_resample": 2, "queries": 100_000, "image_kb": 110,
}


def plan(images: float, gpus: int, backbone: str = "vitl14", cores_per_gpu: int = 12,
         rates_path: str | None = None, **overrides) -> dict:
    """The prediction as a JSON-able dict: per-stage wall hours and GPU-hours, totals, every
    assumption and every rate with where it was measured."""
    if images < 1 or gpus < 1:
        raise UserError("--images and --gpus must be >= 1")
    rates = load_rates(rates_path)
    a = {**DEFAULTS, "backbone": backbone, "cores_per_gpu": cores_per_gpu, **overrides}
    stages = stage_costs(images, gpus, rates, a)
    total = sum(s["wall_hours"] for s in stages)
    return {"images": images, "gpus": gpus, "stages": stages, "total_wall_hours": total,
            "total_gpu_hours": total * gpus, "assumptions": a,
            "rates": {k: {"value": v["value"], "measured": v["measured"]}
                      for k, v in rates["rates"].items()}}


def format_plan(result: dict) -> str:
    """The human-readable table and assumptions printed before the JSON line."""
    lines = [f"predicted cost for {result['images']:.3g} images on {result['gpus']} GPUs",
             f"{'stage':12s} {'wall h':>8s} {'GPU h':>9s}  basis"]
    for s in result["stages"]:
        lines.append(f"{s['stage']:12s} {s['wall_hours']:8.2f} {s['gpu_hours']:9.1f}  "
                     f"{s['basis']}")
    lines.append(f"{'total':12s} {result['total_wall_hours']:8.2f} "
                 f"{result['total_gpu_hours']:9.1f}")
    lines.append("assumptions: " + ", ".join(f"{k}={v}" for k, v in result["assumptions"].items()))
    for k, v in result["rates"].items():
        lines.append(f"rate {k} = {v['value']}  ({v['measured']})")
    return "\n".join(lines)
