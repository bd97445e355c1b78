"""Curation benchmarks: (a) dedup of N x 256 synthetic embeddings with planted copy groups,
(b) k-means (ours, torch) next to faiss.Kmeans defaults in the same run, (c) embedding images/s,
(d) geometric verification of candidate pairs (dedup.verify) on real pictures: pairs/s, and
how many copy pairs it confirms and distinct pairs it rejects.

    python tools/bench_curation.py            # full: 1M vectors, k-means 1M -> 10k
    python tools/bench_curation.py --small    # CI size: 120k vectors, k-means 50k -> 500

The small dedup size is above ``IndexConfig.flat_max``, so CI runs the same IVF search as the
full benchmark (the JSON names the index kind). ``--threads N`` pins faiss and torch threads.

Prints a table and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation import dedup as dd  # noqa: E402
from curation.config import EmbedConfig, IndexConfig  # noqa: E402
from curation.knn import choose_kind, default_nlist, knn  # noqa: E402


def synthetic(n: int, d: int, seed: int = 0, frac_dup: float = 0.05) -> tuple[np.ndarray, dict]:
    """Clustered background (1000 modes) + planted copy groups of 2-5 near-identical vectors."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        x[lo:hi] = 0.4 * centers[rng.integers(0, 1000, hi - lo)] + rng.standard_normal((hi - lo, d))
    planted: list[tuple[int, int]] = []
    perm = rng.permutation(n)
    pos, budget = 0, int(frac_dup * n)
    while pos < budget:
        size = int(rng.integers(2, 6))
        members = np.sort(perm[pos: pos + size])
        pos += size
        base = x[members[0]]
        noise = rng.uniform(0.2, 0.6)
        jitter = rng.standard_normal((len(members) - 1, d)).astype(np.float32)
        x[members[1:]] = base + noise * jitter
        planted.extend((int(a), int(b)) for i, a in enumerate(members) for b in members[i + 1:])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, {"pairs": planted, "copies": pos}


def exact_pairs_above(x: np.ndarray, queries: np.ndarray, threshold: float,
                      k: int) -> list[tuple[int, int]]:
    """Pairs (query, j) with x[query].x[j] > threshold among each query's best ``k - 1``
    others, by brute force over all rows (torch matrix products, 100 queries at a time)."""
    xt = torch.from_numpy(x)
    pairs = []
    for lo in range(0, len(queries), 100):
        block = queries[lo: lo + 100]
        qsims = (xt[torch.from_numpy(block)] @ xt.T).numpy()
        qsims[np.arange(len(block)), block] = -1
        for row, qi in enumerate(block):
            nbrs = np.flatnonzero(qsims[row] > threshold)
            nbrs = nbrs[np.argsort(-qsims[row, nbrs], kind="stable")][: k - 1]
            pairs.extend((int(qi), int(j)) for j in nbrs)
    return pairs


def bench_dedup(n: int, d: int, threshold: float, k: int, nprobe: int,
                kind: str = "auto") -> dict:
    """kNN graph + components; recall/precision vs planted pairs and vs exact search."""
    x, truth = synthetic(n, d)
    cfg = IndexConfig(kind=kind, nprobe=nprobe)
    t0 = time.perf_counter()
    sims, ids = knn(x, k, cfg, progress=False)
    t_knn = time.perf_counter() - t0
    edges = dd.knn_edges(sims, ids, threshold)
    res = dd.dedup(n, edges, threshold)
    wall = time.perf_counter() - t0
    planted = np.asarray(truth["pairs"], dtype=np.int64)
    psim = np.sum(x[planted[:, 0]] * x[planted[:, 1]], 1)
    planted_above = planted[psim > threshold]
    found = set(zip(edges.i.tolist(), edges.j.tolist()))
    pset = {(int(a), int(b)) for a, b in planted_above}
    recall_planted = len(found & pset) / max(1, len(pset))
    precision_planted = len(found & pset) / max(1, len(found))
    same = res.labels[planted_above[:, 0]] == res.labels[planted_above[:, 1]]
    # recall against exact search on a sample of queries (brute force over all N)
    rng = np.random.default_rng(1)
    q = np.sort(rng.choice(n, size=min(n, 2000), replace=False))
    exact = exact_pairs_above(x, q, threshold, k)
    hits = sum((min(a, b), max(a, b)) in found for a, b in exact)
    kind = choose_kind(n, cfg)
    return {"n": n, "dim": d, "index": kind, "nprobe": nprobe if kind != "flat" else None,
            "nlist": (cfg.nlist or default_nlist(n)) if kind != "flat" else None,
            "seconds": round(wall, 1), "knn_seconds": round(t_knn, 1),
            "planted_pairs": len(pset), "recall_planted": round(recall_planted, 4),
            "precision_planted": round(precision_planted, 4),
            "planted_same_group": round(float(same.mean()), 4),
            "exact_pairs": len(exact), "recall_vs_exact": round(hits / max(1, len(exact)), 4),
            "removed": int((~res.keep).sum())}


def bench_kmeans(n: int, d: int, k: int, n_iter: int) -> dict:
    """Our torch k-means vs faiss.Kmeans with its defaults (niter=25) on the same data."""
    from curation.kmeans import inertia, kmeans_torch

    x, _ = synthetic(n, d, seed=2, frac_dup=0.0)
    t0 = time.perf_counter()
    ours, _ = kmeans_torch(x, k, n_iter=n_iter, seed=0)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    km = faiss.Kmeans(d, k, niter=n_iter, seed=0)
    km.train(x)
    t_faiss = time.perf_counter() - t0
    return {"n": n, "k": k, "iters": n_iter, "ours_seconds": round(t_ours, 1),
            "faiss_seconds": round(t_faiss, 1), "ratio": round(t_ours / t_faiss, 2),
            "ours_inertia": round(inertia(x, ours), 5),
            "faiss_inertia": round(inertia(x, km.centroids), 5)}


def bench_embed(n_images: int, arch: str, img_size: int, workers: int) -> dict:
    """Images/s of the embed stage (decode + preprocess + forward) on synthetic JPEGs."""
    from PIL import Image

    from curation.backbone import load_feature_model
    from curation.embed import embed_chunks, resolve_device
    from dinosys.export import save_native
    from dinosys.models import create_backbone

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(n_images):
            arr = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
            img = Image.fromarray(arr).resize((400, 300), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            paths.append(tmp / f"{i}.jpg")
            paths[-1].write_bytes(buf.getvalue())
        torch.manual_seed(0)
        save_native(create_backbone(arch, img_size=img_size).eval(), tmp / "model")
        fm = load_feature_model(str(tmp / "model"))
        rows = {"id": np.arange(n_images), "path": np.array([str(p) for p in paths]),
                "member": np.array([""] * n_images), "offset": np.full(n_images, -1),
                "size": np.full(n_images, -1)}
        cfg = EmbedConfig(model=str(tmp / "model"), img_size=img_size, batch_size=32,
                          num_workers=workers, chunk_size=n_images)
        t0 = time.perf_counter()
        embed_chunks(fm, rows, cfg, tmp / "out", progress=False)
        wall = time.perf_counter() - t0
    return {"arch": arch, "img_size": img_size, "images": n_images,
            "images_per_s": round(n_images / wall, 1),
            "device": str(resolve_device(cfg.device))}


def bench_verify(n_pairs: int, workers: int) -> dict:
    """Pairs/s of dedup.verify on scikit-image's pictures and their near-copies (crop, resize,
    JPEG, colour, rotation, text overlay): every copy pair plus random pairs of distinct
    pictures, features included in the time."""
    from PIL import Image

    from curation.config import VerifyConfig
    from curation.copy_train import skimage_data_dir
    from curation.demo_pool import near_copies
    from curation.verify import extract_features, grey_image, verify_edges

    # one of each stereo pair / colour variant: those are near-copies of each other
    skip = {"motorcycle_right.png", "chessboard_GRAY.png"}
    files = sorted(p for p in skimage_data_dir().iterdir()
                   if p.suffix in (".png", ".jpg") and p.name not in skip)
    blobs, group = [], []
    for g, path in enumerate(files):
        img = Image.open(path).convert("RGB")
        img.thumbnail((384, 384))
        for version in (img, *near_copies(img).values()):
            buf = io.BytesIO()
            version.save(buf, format="PNG")
            blobs.append(buf.getvalue())
            group.append(g)
    group = np.array(group)
    ii, jj = np.triu_indices(len(blobs), 1)
    same = group[ii] == group[jj]
    rng = np.random.default_rng(0)
    other = rng.choice(np.flatnonzero(~same), max(0, min(n_pairs - int(same.sum()),
                                                         int((~same).sum()))), replace=False)
    pick = np.sort(np.concatenate([np.flatnonzero(same), other]))
    cfg = VerifyConfig(workers=workers)
    t0 = time.perf_counter()
    for b in blobs:
        extract_features(grey_image(b, cfg.max_side, 10**9), cfg.n_features,
                         cfg.contrast_threshold)
    feat_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = verify_edges(ii[pick], jj[pick], blobs.__getitem__, cfg, Path(tmp), progress=False)
        wall = time.perf_counter() - t0
    truth = same[pick]
    # dedup needs each copy joined to its original through confirmed pairs, not every pair
    ok = res.confirmed
    labels = dd.components(len(blobs), dd.Edges(ii[pick][ok], jj[pick][ok], np.ones(ok.sum())))
    first = np.searchsorted(group, group)  # index of each image's original
    is_copy = np.arange(len(blobs)) != first
    return {"pictures": len(files), "images": len(blobs), "pairs": int(len(pick)),
            "copy_pairs": int(truth.sum()), "workers": workers,
            "features_images_per_s_1thread": round(len(blobs) / feat_s, 1),
            "pairs_per_s": round(len(pick) / wall, 1),
            "copy_pairs_confirmed": round(float(res.confirmed[truth].mean()), 4),
            "copies_grouped_with_original": round(float(
                (labels[is_copy] == labels[first[is_copy]]).mean()), 4),
            "distinct_pairs_rejected": round(float((~res.confirmed[~truth]).mean()), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CI size")
    p.add_argument("--n", type=int, help="dedup vectors (default 1M, small 120k)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--nprobe", type=int, default=IndexConfig().nprobe)
    p.add_argument("--index-kind", default="auto", choices=("auto", "flat", "ivf", "ivfpq"))
    p.add_argument("--kmeans-n", type=int, help="default 1M, small 50k")
    p.add_argument("--kmeans-k", type=int, help="default 10k, small 500")
    p.add_argument("--kmeans-iters", type=int, default=25, help="faiss.Kmeans default: 25")
    p.add_argument("--embed-images", type=int, default=None)
    p.add_argument("--embed-arch", default="vits14")
    p.add_argument("--verify-pairs", type=int, help="default 20000, small 2000")
    p.add_argument("--skip", default="", help="comma list of dedup,kmeans,embed,verify to skip")
    p.add_argument("--threads", type=int, help="faiss and torch threads (default: all cores)")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    n = args.n or (120_000 if args.small else 1_000_000)
    kn = args.kmeans_n or (50_000 if args.small else 1_000_000)
    kk = args.kmeans_k or (500 if args.small else 10_000)
    result: dict = {"small": args.small, "threads": {"faiss": faiss.omp_get_max_threads(),
                                                     "torch": torch.get_num_threads()}}
    if "dedup" not in skip:
        result["dedup"] = bench_dedup(n, args.dim, args.threshold, args.k, args.nprobe,
                                      args.index_kind)
    if "kmeans" not in skip:
        result["kmeans"] = bench_kmeans(kn, args.dim, kk, args.kmeans_iters)
    if "embed" not in skip:
        result["embed"] = bench_embed(args.embed_images or (32 if args.small else 256),
                                      args.embed_arch, 224, 2)
    if "verify" not in skip:
        result["verify"] = bench_verify(args.verify_pairs or (2_000 if args.small else 20_000),
                                        args.threads or os.cpu_count() or 1)
    print(f"{'benchmark':<10} {'metric':<30} value")
    for section, values in result.items():
        if isinstance(values, dict):
            for key, value in values.items():
                print(f"{section:<10} {key:<30} {value}")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
