"""The data stages: ``pool`` (the demo's raw pool from the embedded data) and ``curate`` (the
``dinosys-curate run`` pipeline, as a subprocess: dinosys never imports curation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dinosys.errors import UserError
from dinosys.factory.record import sha256_file
from dinosys.factory.stages import Context, Stage, ensure_builtin, register_stage


def _run_pool(ctx: Context) -> dict:
    from dinosys.data.builtin import build_builtin
    from dinosys.factory.demo_pool import build_demo_pool

    builtin = Path(ctx.builtin)
    build_builtin(builtin, sets=["mnist"])
    pool = ctx.cfg.pool
    return build_demo_pool(ctx.dir("pool") / "shards", builtin, pool.near_duplicates,
                           pool.contamination, pool.seed)


register_stage(Stage(
    "pool", (), _run_pool, "the raw pool: embedded MNIST train + planted near-duplicates and "
    "copies of the val images (pool.kind=mnist_planted)",
    enabled=lambda cfg: cfg.pool.kind != "none",
    numbers=(("images", "images"), ("planted dups", "planted_near_duplicates"),
             ("planted val copies", "planted_contamination"))))


def curate_argv(ctx: Context, step: str = "run") -> list[str]:
    """The ``dinosys-curate STEP ...`` arguments of the stage: the recipe, the work directory
    ``OUT/curate``, the pool as ``sources`` (when the pipeline built one), the stage's overrides
    and its part (when one is given). ``step`` is ``run`` (every step, then the merges) or one
    split step (``ingest``, ``embed``, ``dedup``, ...: one Slurm array of a launcher)."""
    argv = [step, str(ctx.cfg.curate.recipe), "--out", str(ctx.dir("curate")), "--no-progress"]
    if "pool" in ctx.records:
        argv.append(f"sources=[{{path: \"{ctx.records['pool']['pool']}\", name: pool}}]")
    argv += ctx.overrides("curate")
    if ctx.part is not None:
        argv += ["--part", f"{ctx.part[0]}/{ctx.part[1]}"]
    return argv


def curate_command(ctx: Context, step: str = "run") -> list[str]:
    """The full command line: this Python running ``curation.cli`` with :func:`curate_argv`."""
    return [sys.executable, "-m", "curation.cli", *curate_argv(ctx, step)]


def manifest_counts(manifest: Path) -> dict:
    """Kept and removed images of a curation manifest, by reason."""
    import pyarrow.parquet as pq

    table = pq.read_table(manifest, columns=["role", "status", "reason", "member", "path"])
    cols = table.to_pydict()
    pool = [i for i, r in enumerate(cols["role"]) if r == "pool"]
    reason = [str(cols["reason"][i]) for i in pool]
    return {"pool": len(pool),
            "kept": sum(cols["status"][i] == "kept" for i in pool),
            "removed_near_duplicates": sum(r.startswith("near_duplicate") for r in reason),
            "removed_contamination": sum(r.startswith("eval_contamination") for r in reason),
            "removed_exact_duplicates": sum(r.startswith("exact_duplicate") for r in reason),
            "removed_other": sum(cols["status"][i] == "rejected" and not r.startswith(
                ("near_duplicate", "eval_contamination", "exact_duplicate"))
                for i, r in zip(pool, reason))}


def planted_outcome(manifest: Path, planted_file: Path) -> dict:
    """How the curation treated the planted images of the demo pool (by sample key)."""
    import pyarrow.parquet as pq

    planted = json.loads(planted_file.read_text())
    cols = pq.read_table(manifest, columns=["member", "status"]).to_pydict()
    status = {Path(m).name.partition(".")[0]: s for m, s in zip(cols["member"], cols["status"])}
    dups = planted["near_duplicates"]
    cons = planted["contamination"]
    removed = sum(status.get(k) == "rejected" for k in dups)
    survived = [k for k in cons if status.get(k) == "kept"]
    return {"planted_near_duplicates": len(dups),
            "planted_near_duplicates_removed": removed,
            "planted_near_duplicates_removed_frac": round(removed / max(1, len(dups)), 4),
            "planted_contamination": len(cons),
            "planted_contamination_survived": len(survived)}


def _run_curate(ctx: Context) -> dict:
    ensure_builtin(ctx, ctx.cfg.curate.overrides)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # where dinosys (and curation) come from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(curate_command(ctx), env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise UserError(f"stage curate: dinosys-curate exited with code {proc.returncode} "
                        f"(its error is above)")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    summary = json.loads(lines[-1]) if lines else {}
    if ctx.part is not None and ctx.part[0] != 0:
        return {"part_only": True}  # part 0 merges last and records the stage
    shards = ctx.dir("curate") / "shards"
    manifest = shards / "manifest.parquet"
    if not manifest.is_file():
        raise UserError(f"stage curate: dinosys-curate finished without {manifest}")
    result = {"shards": str(shards), "manifest": str(manifest),
              "manifest_sha256": sha256_file(manifest),
              "report_html": str(shards / "curation_report.html"),
              "samples": summary.get("shard", {}).get("samples"), **manifest_counts(manifest)}
    if "pool" in ctx.records:
        from dinosys.factory.demo_pool import PLANTED_KEYS

        result.update(planted_outcome(manifest, Path(ctx.records["pool"]["pool"]) / PLANTED_KEYS))
    return result


register_stage(Stage(
    "curate", ("pool",), _run_curate, "dinosys-curate run: dedup, decontamination, clusters, "
    "caption shards + manifest + report (--part i/n: one array task, all run together)",
    numbers=(("kept", "kept"), ("near-dups removed", "removed_near_duplicates"),
             ("val copies removed", "removed_contamination"),
             ("planted dups removed", "planted_near_duplicates_removed_frac"),
             ("planted val copies kept", "planted_contamination_survived"))))
