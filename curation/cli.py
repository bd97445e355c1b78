"""`dinosys-curate`: run the whole curation pipeline or one stage.

    dinosys-curate run CONFIG [--out DIR] [--part i/n] [key=value ...]
    dinosys-curate {ingest,embed,dedup,verify,cluster,retrieve,shard} CONFIG [--part i/n]
    dinosys-curate {ingest,embed,dedup,cluster,retrieve,shard} CONFIG --merge [N]
    dinosys-curate report CONFIG
    dinosys-curate plan --images N --gpus K [--backbone vitl14]   (predicted cost per stage)
    dinosys-curate demo-pool --out DIR [--data data/builtin]   (photos with planted copies)

Every stage is idempotent: it skips itself when its done-marker matches the digest of its inputs
and config. A stage run with ``--part i/n`` does its share only (a Slurm array task, a torchrun
rank); ``--merge`` then checks every part and merges them; without either the stage runs whole
(or merges parts that are all done). Errors in the input end with one line on stderr and exit
code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dinosys.errors import UserError

STAGES = ("ingest", "embed", "dedup", "verify", "cluster", "retrieve", "shard", "report")
SPLIT = ("ingest", "embed", "dedup", "verify", "cluster", "retrieve", "shard")


def _load(args: argparse.Namespace):
    from curation.config import CurationConfig
    from dinosys.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "out", None):
        overrides.append(f"out={args.out}")
    cfg = load_config(CurationConfig, args.config, overrides, kind="curation")
    if args.no_progress:
        cfg.progress = False
    return cfg


def _run(args: argparse.Namespace) -> int:
    from curation import pipeline
    from dinosys.cli import parse_part, print_json

    cfg = _load(args)
    stage = args.command
    merge = getattr(args, "merge", None)
    part = parse_part(getattr(args, "part", None))
    if part is None and stage in ("run", *SPLIT) and merge is None:
        env_part = pipeline.part_from_env()
        part = env_part if env_part[1] > 1 else None
    if part is not None and merge is not None:
        raise UserError("--part and --merge: a process either runs a part or merges them")
    merge_arg = False if merge is None else (True if merge == 0 else merge)
    if stage == "run":
        before = stage_markers(cfg)
        summary = pipeline.run_all(cfg, part or (0, 1))
        summary.update(run_outcome(cfg, before, stage_markers(cfg)))
        for line in outcome_lines(summary):
            print(line)
    elif stage == "embed":
        summary = pipeline.stage_embed(cfg, part, args.max_chunks, merge_arg)
    else:
        summary = pipeline.run_stage(cfg, stage, part, merge_arg)
    if part is not None:
        summary = {"part": f"{part[0]}/{part[1]}", **summary}
    print_json({"stage": stage, **summary})
    return 0


# the stage folders under the work directory, in pipeline order
STAGE_DIRS = ("ingest", "embed", "embed_copy", "knn", "verify", "dedup", "cluster", "retrieve",
              "shards", "report")


def stage_markers(cfg) -> dict[str, tuple[int, str]]:
    """Each finished stage's done-marker: (mtime, contents); a rewritten marker means the stage
    ran again."""
    from curation.work import work_dir

    work = work_dir(cfg)
    out = {}
    for marker in sorted(work.glob("*/DONE.json")) if work.is_dir() else []:
        out[marker.parent.name] = (marker.stat().st_mtime_ns, marker.read_text())
    return out


def run_outcome(cfg, before: dict, after: dict) -> dict:
    """Where the outputs went and which stages were reused (marker untouched) or run."""
    from curation.work import work_dir

    order = {name: i for i, name in enumerate(STAGE_DIRS)}
    names = sorted(after, key=lambda n: (order.get(n, len(order)), n))
    shards = work_dir(cfg) / "shards"
    return {"reused": [n for n in names if before.get(n) == after[n]],
            "ran": [n for n in names if before.get(n) != after[n]],
            "shards": str(shards), "manifest": str(shards / "manifest.parquet"),
            "report_html": str(shards / "curation_report.html")}


def outcome_lines(summary: dict) -> list[str]:
    """The short summary `dinosys-curate run` prints before its JSON line."""
    shard = summary.get("shard") if isinstance(summary.get("shard"), dict) else {}
    count = (f" ({shard['shards']} shard(s), {shard['samples']} images)"
             if "shards" in shard and "samples" in shard else "")
    return [f"stages reused (inputs and config unchanged): {', '.join(summary['reused']) or '-'}",
            f"stages run now: {', '.join(summary['ran']) or '-'}",
            f"shards:   {summary['shards']}{count}",
            f"manifest: {summary['manifest']}",
            f"report:   {summary['report_html']}"]


def _plan(args: argparse.Namespace) -> int:
    from curation.plan import format_plan, plan
    from dinosys.cli import print_json

    result = plan(args.images, args.gpus, args.backbone, args.cores_per_gpu, args.rates)
    print(format_plan(result))
    print_json(result)
    return 0


def _demo_pool(args: argparse.Namespace) -> int:
    from pathlib import Path

    from curation.demo_pool import build_pool
    from dinosys.cli import print_json
    from dinosys.data.builtin import build_builtin

    build_builtin(Path(args.data), sets=["photos"])
    copies = build_pool(Path(args.out), Path(args.data))
    n = sum(1 for p in Path(args.out).iterdir() if p.suffix == ".png")
    print_json({"pool": args.out, "images": n, "planted_copies": len(copies),
                "planted_list": str(Path(args.out) / "planted.json")})
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `dinosys-curate`."""
    parser = argparse.ArgumentParser(
        prog="dinosys-curate",
        description="Curate raw images into LVD-style shards: embed, dedup, decontaminate, "
        "cluster, retrieve, shard, report.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="STAGE", required=True)
    helps = {"run": "every stage in order", "ingest": "list and hash the sources",
             "embed": "ingest + embed (resumable, --part i/n)",
             "dedup": "near-duplicate removal and decontamination (--part: k-NN query slices)",
             "verify": "geometric verification of dedup candidates by blocks (--part i/n)",
             "cluster": "hierarchical k-means", "retrieve": "retrieval / balanced sampling",
             "shard": "WebDataset shards + manifest.parquet", "report": "curation_report.html"}
    for name in ("run", *STAGES):
        p = sub.add_parser(name, help=helps[name])
        p.add_argument("config", help="YAML path or a name under configs/curation/")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        p.add_argument("--out", help="work directory: stages, shards, manifest, report "
                       "(default: the config's `out`; same as the override out=DIR)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name in ("run", *SPLIT):
            p.add_argument("--part", help="this process's part i/n of the stage's work "
                           "(default: torchrun RANK/WORLD_SIZE or the Slurm array task)")
        if name in SPLIT and name != "verify":
            p.add_argument("--merge", nargs="?", type=int, const=0, default=None, metavar="N",
                           help="merge the stage's parts (N: how many; default: the only split "
                           "found)")
        if name == "embed":
            p.add_argument("--max-chunks", type=int, default=None,
                           help="embed at most this many chunks, then stop (resume later)")
        p.set_defaults(func=_run)
    p = sub.add_parser("plan", help="predicted wall-clock and GPU-hours per stage for N images "
                       "on K GPUs, from measured per-stage rates")
    p.add_argument("--images", type=float, required=True, help="pool size, e.g. 1e9")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (one part per GPU)")
    p.add_argument("--backbone", default="vitl14", help="embedding backbone of the rates table")
    p.add_argument("--cores-per-gpu", type=int, default=12,
                   help="CPU cores per GPU for the CPU stages (ingest, verification, shards)")
    p.add_argument("--rates", default=None, help="a JSON file of measured rates replacing the "
                   "shipped ones (same keys)")
    p.set_defaults(func=_plan)
    p = sub.add_parser("demo-pool", help="write the embedded photos with planted near-copies "
                       "among distinct images (the demo and quality-test pool)")
    p.add_argument("--out", default="data/curation_demo_pool", help="pool directory to write")
    p.add_argument("--data", default="data/builtin", help="embedded data (built if missing)")
    p.set_defaults(func=_demo_pool)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dinosys-curate` console script."""
    from dinosys.cli import run_cli

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # CPU-feature probing noise
    return run_cli(build_parser(), argv, "dinosys-curate")


if __name__ == "__main__":
    sys.exit(main())
