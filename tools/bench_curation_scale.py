"""The split dedup at scale: N x d synthetic embeddings (fp16, on disk) with planted copy groups
through `dinosys-curate dedup --part i/P` (one process per part, ``--concurrent`` at a time,
one thread each) and `dinosys-curate dedup --merge`: wall time per stage (index build, every
part, merge), peak RSS of every part (target < 4 GiB), recall of the planted pairs.

    python tools/bench_curation_scale.py                  # 10M x 256 in 4 parts (the target)
    python tools/bench_curation_scale.py --n 200000       # CI size (tests/curation)

The pool is written straight into a work directory as the embed stage would leave it (ids,
fp16 embeddings, an item table), so the parts run the real stage code. Planted groups: 2-5
copies of one vector plus Gaussian noise, members spread over the whole pool (so copies sit in
different parts' slices). Prints a table and, as its last line, one JSON object; ``--rates``
appends the measured per-part rate to a rates file for `dinosys-curate plan`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation.ingest import COLUMNS  # noqa: E402
from curation.store import NpyWriter, Stage, load_npy, save_npy  # noqa: E402

BLOCK = 500_000


def write_pool(work: Path, n: int, d: int, seed: int = 0, frac_dup: float = 0.05,
               modes: int = 1000) -> np.ndarray:
    """Write ``work/embed/embeddings.npy`` (fp16, L2-normalised): clustered background plus
    planted copy groups; returns the planted pairs ``(a, b)``, a < b."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((modes, d)).astype(np.float32)
    perm = rng.permutation(n)
    groups, pos = [], 0
    while pos < int(frac_dup * n):
        size = int(rng.integers(2, 6))
        groups.append(np.sort(perm[pos: pos + size]))
        pos += size
    del perm
    # every member of group g is the group's vector (background-like, from its own seed) plus
    # noise of the group's level; the first member has no noise
    member = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    group_of = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    first = np.concatenate([[True] + [False] * (len(g) - 1) for g in groups]) \
        if groups else np.zeros(0, bool)
    level = rng.uniform(0.2, 0.6, len(groups))
    order = np.argsort(member)
    member, group_of, first = member[order], group_of[order], first[order]

    def background(lo: int, hi: int) -> np.ndarray:
        r = np.random.default_rng([seed, lo])
        return (0.4 * centers[r.integers(0, modes, hi - lo)]
                + r.standard_normal((hi - lo, d), dtype=np.float32))

    gr = np.random.default_rng([seed, 2])
    group_vecs = (0.4 * centers[gr.integers(0, modes, len(groups))]
                  + gr.standard_normal((len(groups), d), dtype=np.float32))

    out = NpyWriter(work / "embed" / "embeddings.npy", (n, d), np.float16)
    for lo in range(0, n, BLOCK):
        hi = min(n, lo + BLOCK)
        x = background(lo, hi)
        a, b = np.searchsorted(member, [lo, hi])
        rows, g = member[a:b] - lo, group_of[a:b]
        jitter = np.random.default_rng([seed, 1, lo]).standard_normal((len(rows), d),
                                                                       dtype=np.float32)
        x[rows] = group_vecs[g] + np.where(first[a:b], 0.0, level[g])[:, None] * jitter
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out.write(x)
    out.close()
    save_npy(work / "embed" / "ids.npy", np.arange(n, dtype=np.int64))
    pairs = [(int(a), int(b)) for g in groups for i, a in enumerate(g) for b in g[i + 1:]]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def write_items(work: Path, n: int) -> None:
    """An item table of ``n`` readable pool images (what ingest would have written)."""
    cols = {c: None for c in COLUMNS}
    cols.update(id=pa.array(np.arange(n, dtype=np.int64)),
                offset=pa.array(np.full(n, -1, np.int64)), size=pa.array(np.zeros(n, np.int64)),
                dup_of=pa.array(np.full(n, -1, np.int64)))
    for name, value in (("role", "pool"), ("source", "synthetic"), ("path", "synthetic"),
                        ("member", ""), ("sha256", ""), ("caption", ""), ("status", "ok"),
                        ("reason", "")):
        cols[name] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)),
                                                    pa.array([value])).cast(pa.string())
    (work / "ingest").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), work / "ingest" / "items.parquet")
    Stage(work, "ingest").mark_done("synthetic", {"images": n})
    Stage(work, "embed").mark_done(f"synthetic-{n}", {"embedded": n})


def config(work: Path, args: argparse.Namespace) -> Path:
    """The curation config of the run (the dedup and index keys the parts read)."""
    cfg = {"name": "bench_scale", "out": str(work), "progress": False,
           "sources": [{"path": str(work), "name": "synthetic"}],
           "embed": {"model": "synthetic"},
           "dedup": {"k": args.k, "threshold": args.threshold, "decontam_threshold": 0.99,
                     "sweep": [args.threshold]},
           "index": {"kind": "ivf", "nlist": args.nlist, "nprobe": args.nprobe,
                     "part_block": args.block}}
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(args: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "curation.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen, what: str) -> None:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}): {err[-3000:]}")


def run(args: argparse.Namespace) -> dict:
    """Generate, run the parts and the merge, measure."""
    root = Path(args.work or tempfile.mkdtemp(prefix="bench_curation_scale-"))
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    save_npy(root / "planted.npy", write_pool(work, args.n, args.dim, args.seed))
    write_items(work, args.n)  # the parts start from here: nothing large held meanwhile
    t_gen = time.perf_counter() - t0
    cfg = str(config(work, args))
    p = args.parts
    t0 = time.perf_counter()
    running: list[tuple[int, subprocess.Popen, float]] = []
    done: dict[int, float] = {}
    todo = list(range(p))
    while todo or running:
        while todo and len(running) < args.concurrent:
            i = todo.pop(0)
            running.append((i, _cli(["dedup", cfg, "--part", f"{i}/{p}"], args.threads),
                            time.perf_counter()))
        time.sleep(0.5)
        for item in list(running):
            i, proc, start = item
            if proc.poll() is not None:
                _wait(proc, f"part {i}/{p}")
                done[i] = time.perf_counter() - start
                running.remove(item)
    t_parts = time.perf_counter() - t0
    t0 = time.perf_counter()
    _wait(_cli(["dedup", cfg, "--merge"], args.concurrent * args.threads), "merge")
    t_merge = time.perf_counter() - t0
    index_dir = next((work / "knn").glob("index-*"))
    index = json.loads((index_dir / "DONE.json").read_text())["summary"]
    records = [json.loads((work / "knn" / "parts" / str(p) / f"part-{i}.json").read_text())
               for i in range(p)]
    dedup = json.loads((work / "dedup" / "DONE.json").read_text())["summary"]
    planted = load_npy(root / "planted.npy")
    # recall: planted pairs above the threshold found as edges, and put in one copy group
    emb = load_npy(work / "embed" / "embeddings.npy", mmap=True)
    psim = np.einsum("ij,ij->i", np.asarray(emb[planted[:, 0]], np.float32),
                     np.asarray(emb[planted[:, 1]], np.float32))
    above = planted[psim > args.threshold]
    ei = load_npy(work / "knn" / "edges_i.npy")
    ej = load_npy(work / "knn" / "edges_j.npy")
    es = load_npy(work / "knn" / "edges_sim.npy")
    strong = es > args.threshold
    found = np.isin(above[:, 0] * args.n + above[:, 1], ei[strong] * args.n + ej[strong])
    labels = pq.read_table(work / "dedup" / "pool.parquet",
                           columns=["dedup_group"]).column(0).to_numpy()
    same = labels[above[:, 0]] == labels[above[:, 1]]
    parts = [{"part": r["part"], "seconds": done[r["part"]],
              "search_seconds": r["summary"]["search_seconds"],
              "search_cpu_seconds": r["summary"]["search_cpu_seconds"],
              "peak_rss_gib": r["summary"]["peak_rss_gib"], "edges": r["summary"]["edges"]}
             for r in records]
    result = {
        "n": args.n, "dim": args.dim, "parts": p, "concurrent": args.concurrent,
        "threads_per_part": args.threads, "k": args.k, "nlist": args.nlist,
        "nprobe": args.nprobe, "threshold": args.threshold, "generate_seconds": round(t_gen, 1),
        "index_seconds": index["seconds"], "index_cpu_seconds": index["cpu_seconds"],
        "index_peak_rss_gib": index["peak_rss_gib"],
        "parts_wall_seconds": round(t_parts, 1),
        "part_seconds": [round(x["seconds"], 1) for x in parts],
        "part_search_seconds": [x["search_seconds"] for x in parts],
        "part_search_cpu_seconds": [x["search_cpu_seconds"] for x in parts],
        "part_peak_rss_gib": [x["peak_rss_gib"] for x in parts],
        "max_part_peak_rss_gib": max(x["peak_rss_gib"] for x in parts),
        "merge_seconds": round(t_merge, 1),
        "merge_peak_rss_gib": dedup.get("merge_peak_rss_gib"),
        "total_seconds": round(t_parts + t_merge, 1),
        "queries_per_cpu_second": round(args.n / sum(x["search_cpu_seconds"] for x in parts), 1),
        "planted_pairs": int(len(above)), "recall_planted": round(float(found.mean()), 4),
        "planted_same_group": round(float(same.mean()), 4),
        "edges": dedup["edges"], "removed": dedup["near_duplicates"],
        "rss_target_gib": 4.0, "recall_target": 0.99,
    }
    result["targets_met"] = bool(result["max_part_peak_rss_gib"] < 4.0
                                 and result["recall_planted"] >= 0.99)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> None:
    """Parse, run, print the table and the JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--concurrent", type=int, default=2, help="parts running at once")
    p.add_argument("--threads", type=int, default=1, help="threads per part")
    p.add_argument("--k", type=int, default=16, help="dedup.k (copy groups have <= 5 members)")
    p.add_argument("--nlist", type=int, default=None, help="index.nlist (default 4096 at 10M, "
                   "scaled as sqrt(N))")
    p.add_argument("--nprobe", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--block", type=int, default=262_144, help="index.part_block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args()
    if args.nlist is None:
        args.nlist = max(16, int(4096 * (args.n / 10_000_000) ** 0.5))
    result = run(args)
    for key, value in result.items():
        print(f"{key:28s} {value}")
    print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
