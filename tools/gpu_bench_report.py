#!/usr/bin/env python
"""Markdown summary of a tools/gpu_bench.sh run: device, date, commit, one row per benchmark,
and each profile's time shares. The body of a benchmarks/results/ file.

    python tools/gpu_bench_report.py OUT_DIR > summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ["run", "arch", "batch", "compile", "pack", "act. ckpt", "FSDP2", "step ms (median)",
           "images/s", "model TFLOP/s", "MFU", "peak GiB", "timm backbone images/s",
           "full step / timm backbone"]


def _fmt(value: object, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def row(r: dict) -> list[str]:
    """One table row of a results.jsonl record (a failed run keeps its name and status)."""
    if "arch" not in r:
        return [r.get("run", "?"), f"no result (rc {r.get('rc')})"] + ["-"] * (len(COLUMNS) - 2)
    timm = r.get("timm") or {}
    return [r.get("run", "-"), r["arch"], str(r["batch_per_device"]), _fmt(r["compile"]),
            _fmt(r.get("pack")), _fmt(r["act_ckpt"]), _fmt(r["fsdp"]),
            _fmt(r["step_ms_median"], ".1f"), _fmt(r["images_per_s"], ".1f"),
            _fmt(r["tflops_per_device"], ".1f"),
            _fmt(r["mfu"], ".1%") if r.get("mfu") is not None else "-",
            _fmt(r["peak_mem_gib"], ".1f"),
            _fmt(timm.get("images_per_s"), ".1f") if timm.get("status") == "ok"
            else timm.get("status", "-"),
            _fmt(r.get("speedup_vs_timm_backbone"), ".2f")]


def report(out_dir: Path) -> str:
    """The summary text of ``out_dir`` (device.txt, results.jsonl)."""
    device = (out_dir / "device.txt").read_text().strip() if (out_dir / "device.txt").exists() \
        else "device: unknown"
    results = out_dir / "results.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()
               if line.strip()] if results.exists() else []
    lines = ["Device, date, commit:", "", "```", device, "```", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in records]
    for r in records:
        if "layout_reason" in r:
            lines.append(f"\n{r['run']}: layout: {r['layout_reason']}; "
                         f"{r['gflop_per_step']} GFLOP/step counted (model FLOPs, drop path "
                         f"{r['drop_path_rate']}), peak {r['peak_tflops_per_device']} TFLOP/s")
        prof = r.get("profile")
        if prof:
            shares = ", ".join(f"{k} {v:.1%}" for k, v in prof["share"].items())
            top = "; ".join(f"{t['name'][:60]} ({t['class']}) {t['share']:.1%}"
                            for t in prof["top"][:5])
            lines.append(f"\n{r['run']} profile ({prof['wall_ms_per_step']:.1f} ms/step): "
                         f"{shares}. Top: {top}")
    lines += clip_lines(out_dir / "clip.json")
    return "\n".join(lines) + "\n"


def clip_lines(path: Path) -> list[str]:
    """The CLIP step line (tools/bench_clip.py's JSON), or why there is none."""
    text = path.read_text().strip() if path.exists() else ""
    try:
        c = json.loads(text)
    except json.JSONDecodeError:
        return [f"\nclip: no result ({text[:200] or 'clip.json missing or empty'})"]
    return [f"\nclip step ({c['size']}, batch {c['batch']}, {c['dtype']}, {c['device']}): ours "
            f"{c['samples_per_s']['ours']} samples/s, open_clip {c['samples_per_s']['open_clip']}"
            f", ratio {c['ratio']} (target >= 1.3 on a GPU)"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: gpu_bench_report.py OUT_DIR")
    sys.stdout.write(report(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
