"""Stages split into parts: 1, 2 and 4 parts give the same manifest, kept set and shard bytes;
a killed part reruns alone; bad input (a missing part, parts on another config or index, a
part started twice) ends with one line naming the part and nothing merged."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.cli import main
from tests.curation.conftest import write_config

STAGES = ("ingest", "embed", "dedup", "cluster", "retrieve", "shard")


def _config(tmp_path: Path, inputs: dict, model: Path, out: Path, **extra) -> Path:
    return write_config(tmp_path / f"{out.name}.yaml", inputs, model, out, **{
        "retrieve.queries": [{"path": str(inputs["eval"]), "name": "queries"}],
        "retrieve.mode": "both", "retrieve.k": 6, "retrieve.min_queries": 0,
        "dedup.threshold": 0.95, "dedup.decontam_threshold": 0.97,
        "cluster.target_size": 20, "shards.max_count": 1, **extra})


def run_split(cfg: Path, n: int, out: Path) -> None:
    """Every split stage as n parts then a merge, the way the Slurm arrays run them (each part
    merges the stage before it when it starts), then the report; ``--out`` names the work
    directory (the config's ``out`` points elsewhere)."""
    for stage in STAGES:
        for i in range(n):
            assert main([stage, str(cfg), "--out", str(out), "--part", f"{i}/{n}"]) == 0
    assert main(["shard", str(cfg), "--out", str(out), "--merge"]) == 0
    assert main(["report", str(cfg), "--out", str(out)]) == 0


def outputs(out: Path) -> dict:
    """What must not depend on the number of parts."""
    shards = out / "shards"
    manifest = pq.read_table(shards / "manifest.parquet").to_pydict()
    return {"manifest": manifest,
            "kept": sorted(i for i, s in zip(manifest["id"], manifest["status"]) if s == "kept"),
            "shards": {p.name: p.read_bytes() for p in sorted(shards.glob("*.tar"))},
            "sizes": (shards / "sizes.json").read_text(),
            "pool": pq.read_table(out / "dedup" / "pool.parquet").to_pydict(),
            "selection": pq.read_table(out / "retrieve" / "selection.parquet").to_pydict(),
            "clusters": pq.read_table(out / "cluster" / "clusters.parquet").to_pydict()}


def test_one_two_and_four_parts_give_identical_results(tmp_path: Path, curation_inputs: dict,
                                                       random_export: Path) -> None:
    ref = tmp_path / "one"
    assert main(["run", str(_config(tmp_path, curation_inputs, random_export, ref))]) == 0
    want = outputs(ref)
    assert want["kept"] and len(want["shards"]) > 2
    assert any(not k for k in want["pool"]["keep"])  # dedup removed something
    for n in (2, 4):
        out = tmp_path / f"parts{n}"
        run_split(_config(tmp_path, curation_inputs, random_export, tmp_path / "unused"), n,
                  out)
        got = outputs(out)
        for key in want:
            assert got[key] == want[key], (n, key)
        summary = json.loads((out / "knn" / "DONE.json").read_text())["summary"]
        assert summary["parts"] == n
        rec = json.loads((out / "knn" / "parts" / str(n) / "part-1.json").read_text())
        assert rec["summary"]["peak_rss_gib"] > 0 and rec["index"]


@pytest.mark.slow
def test_run_as_ranks_equals_one_process(tmp_path: Path, curation_inputs: dict,
                                         random_export: Path, repo_root: Path) -> None:
    """`run` in two concurrent processes as RANK 0 and 1 of 2 (torchrun's variables), with
    verification on: each runs its part of every stage, waits for the other, one merges."""
    extra = {"dedup.verify.enabled": True, "dedup.verify.block_size": 2}
    ref = tmp_path / "one"
    assert main(["run", str(_config(tmp_path, curation_inputs, random_export, ref,
                                    **extra))]) == 0
    out = tmp_path / "ranks"
    cfg = str(_config(tmp_path, curation_inputs, random_export, out, **extra))
    procs = [subprocess.Popen([sys.executable, "-m", "curation.cli", "run", cfg],
                              env={**os.environ, "PYTHONPATH": str(repo_root), "RANK": str(r),
                                   "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    assert (out / "verify" / "parts" / "2" / "part-1.json").is_file()
    want, got = outputs(ref), outputs(out)
    for key in want:
        assert got[key] == want[key], key


def _cli(args: list[str], repo_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "curation.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if "dinosys-curate: error" in ln]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_parts_are_named_and_nothing_is_merged(tmp_path: Path, curation_inputs: dict,
                                                    random_export: Path,
                                                    repo_root: Path) -> None:
    out = tmp_path / "bad"
    cfg = str(_config(tmp_path, curation_inputs, random_export, out))
    assert main(["embed", cfg]) == 0
    assert main(["dedup", cfg, "--part", "0/2"]) == 0
    # a missing part
    _one_line_error(_cli(["dedup", cfg, "--merge"], repo_root), "part 1/2", "missing")
    assert not (out / "knn" / "DONE.json").exists() and not (out / "dedup").exists()
    assert not (out / "knn" / "edges_i.npy").exists()
    # a part run with another config
    assert main(["dedup", cfg, "--part", "1/2", "dedup.k=6"]) == 0
    _one_line_error(_cli(["dedup", cfg, "--merge", "2"], repo_root), "part 1/2",
                    "another config")
    assert not (out / "knn" / "DONE.json").exists()
    # a part that searched another index (the index was rebuilt in between)
    index_dirs = sorted((out / "knn").glob("index-*"))
    assert len(index_dirs) == 2  # one per config
    key_dir = next(d for d in index_dirs
                   if json.loads((d / "DONE.json").read_text())["summary"]["id"]
                   == json.loads((out / "knn/parts/2/part-0.json").read_text())["index"])
    for p in key_dir.iterdir():
        p.unlink()
    assert main(["dedup", cfg, "--part", "1/2"]) == 0  # builds a new index, reads it
    _one_line_error(_cli(["dedup", cfg, "--merge"], repo_root), "part 0/2", "another index")
    assert not (out / "knn" / "DONE.json").exists()
    # a part started while the same part runs elsewhere (a live lock of another process)
    lock = out / "knn" / "parts" / "2" / "part-0.lock"
    (out / "knn" / "parts" / "2" / "part-0.json").unlink()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        _one_line_error(_cli(["dedup", cfg, "--part", "0/2"], repo_root), "part 0/2",
                        "already running")
        _one_line_error(_cli(["dedup", cfg, "--merge"], repo_root), "part 0/2",
                        "still running")
    finally:
        sleeper.kill()
        sleeper.wait()
    # its process is gone: the lock is stale, the part runs, the merge succeeds
    assert main(["dedup", cfg, "--part", "0/2"]) == 0
    assert main(["dedup", cfg, "--merge"]) == 0
    assert (out / "dedup" / "DONE.json").exists()


def test_killed_part_reruns_alone(tmp_path: Path, curation_inputs: dict, random_export: Path,
                                  repo_root: Path) -> None:
    ref = tmp_path / "ref"
    assert main(["run", str(_config(tmp_path, curation_inputs, random_export, ref))]) == 0
    out = tmp_path / "killed"
    cfg = str(_config(tmp_path, curation_inputs, random_export, out))
    for stage in ("ingest", "embed", "dedup", "cluster", "retrieve"):
        assert main([stage, cfg]) == 0
    assert main(["shard", cfg, "--part", "0/2"]) == 0
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "curation.cli", "shard", cfg, "--part",
                             "1/2"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    part_dir = out / "shards" / "parts" / "2"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list(part_dir.glob("part-1.shards/*.tar")):  # mid-way: a shard written, not all
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the part finished before it could be killed"
    assert not (part_dir / "part-1.json").exists() and (part_dir / "part-1.lock").exists()
    _one_line_error(_cli(["shard", cfg, "--merge"], repo_root), "part 1/2")
    assert main(["shard", cfg, "--part", "1/2"]) == 0  # the dead part's lock is stale
    assert main(["shard", cfg, "--merge"]) == 0
    assert main(["report", cfg]) == 0
    want, got = outputs(ref), outputs(out)
    for key in want:
        assert got[key] == want[key], key
