"""End-to-end `dinosys-curate` on real files: outputs, manifest, shards, report, idempotence,
resume after kill, parts, and the error convention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from curation.cli import main
from tests.curation.conftest import write_config


def _markers(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/DONE.json")}


def test_run_end_to_end_and_idempotent(tmp_path: Path, curation_inputs: dict,
                                       random_export: Path) -> None:
    out = tmp_path / "work"
    cfg = write_config(tmp_path / "c.yaml", curation_inputs, random_export, out)
    assert main(["run", str(cfg)]) == 0
    shards = out / "shards"
    manifest = pq.read_table(shards / "manifest.parquet").to_pydict()
    n = curation_inputs["n_images"]
    assert len(manifest["id"]) == n  # one row per ingested image, kept or rejected
    reason = dict(zip(manifest["path"], manifest["reason"]))
    photos = curation_inputs["photos"]
    assert reason[str(photos / "exact_copy.png")].startswith("exact_duplicate")
    assert reason[str(photos / "empty.png")].startswith("unreadable")
    assert reason[str(photos / "broken.jpg")].startswith("unreadable")
    assert reason[str(curation_inputs["root"] / "missing.png")].startswith("unreadable")
    roles = np.asarray(manifest["role"])
    status = np.asarray(manifest["status"])
    assert set(status[roles == "pool"]) <= {"kept", "rejected"}
    assert all(r for s, r in zip(status, manifest["reason"]) if s == "rejected")
    sizes = json.loads((shards / "sizes.json").read_text())
    kept = int((status == "kept").sum())
    assert kept > 0 and sum(sizes.values()) == kept and max(sizes.values()) <= 5
    # shards hold original bytes + provenance (+ caption for shard inputs), keys without dots
    seen = {}
    for tar_name in sizes:
        with tarfile.open(shards / tar_name) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                seen.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert len(seen) == kept
    for fields in seen.values():
        meta = json.loads(fields["json"])
        assert meta["sha256"] and meta["cluster_path"].count("/") == 1
        img_ext = next(e for e in fields if e in ("png", "jpg", "webp"))
        assert Image.open(__import__("io").BytesIO(fields[img_ext])).size[0] > 0
        if meta["source"] == "mnist_shards":
            assert fields["txt"].decode().startswith("digit")
    keys = dict(zip(manifest["id"], manifest["key"]))
    assert {k for k in keys.values() if k} == set(seen)
    # report and readable plots
    html = (shards / "curation_report.html").read_text()
    pngs = sorted((shards / "report").glob("*.png"))
    assert len(pngs) >= 5 and all(f"report/{p.name}" in html for p in pngs)
    for p in pngs:
        assert Image.open(p).size[0] > 100
    # a second run does nothing: every stage marker is untouched
    before = _markers(out)
    assert main(["run", str(cfg)]) == 0
    assert _markers(out) == before
    # a new dedup threshold re-runs dedup and later stages, not embedding
    emb_mtime = (out / "embed" / "embeddings.npy").stat().st_mtime_ns
    assert main(["run", str(cfg), "dedup.threshold=0.9999999"]) == 0
    after = _markers(out)
    assert after["embed"] == before["embed"] and after["ingest"] == before["ingest"]
    assert after["dedup"] != before["dedup"] and after["shards"] != before["shards"]
    assert (out / "embed" / "embeddings.npy").stat().st_mtime_ns == emb_mtime


def _emb(out: Path) -> np.ndarray:
    return np.load(out / "embed" / "embeddings.npy")


def test_embed_parts_and_max_chunks_match_single_run(tmp_path: Path, curation_inputs: dict,
                                                     random_export: Path) -> None:
    ref = tmp_path / "ref"
    cfg = write_config(tmp_path / "c.yaml", curation_inputs, random_export, ref)
    assert main(["embed", str(cfg)]) == 0
    split = tmp_path / "split"
    # part 0 ingests (part 1 would wait for that) and embeds one of its chunks only
    assert main(["embed", str(cfg), f"out={split}", "--part", "0/2", "--max-chunks", "1"]) == 0
    assert main(["embed", str(cfg), f"out={split}", "--part", "1/2"]) == 0
    assert not (split / "embed" / "DONE.json").exists()
    assert main(["embed", str(cfg), f"out={split}", "--part", "0/2"]) == 0  # finishes, merges
    assert (split / "embed" / "DONE.json").exists()
    np.testing.assert_array_equal(np.load(split / "embed" / "ids.npy"),
                                  np.load(ref / "embed" / "ids.npy"))
    np.testing.assert_allclose(_emb(split).astype(np.float32), _emb(ref).astype(np.float32),
                               atol=2e-3)


def test_embed_resumes_after_kill(tmp_path: Path, curation_inputs: dict, random_export: Path,
                                  repo_root: Path) -> None:
    out = tmp_path / "work"
    cfg = write_config(tmp_path / "c.yaml", curation_inputs, random_export, out,
                       **{"embed.chunk_size": 2, "embed.batch_size": 1})
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "curation.cli", "embed", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("embed/chunks-*/chunk-000002.json")):
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("embed/chunks-*/chunk-*"))
    assert done, "the killed run wrote no chunk"
    assert not (out / "embed" / "DONE.json").exists() or proc.returncode == 0
    stamps = {p: p.stat().st_mtime_ns for p in done if p.name.endswith(".json")}
    assert main(["embed", str(cfg)]) == 0
    summary = json.loads((out / "embed" / "DONE.json").read_text())["summary"]
    assert summary["chunks_written_now"] == summary["chunks_total"] - len(stamps)
    for p, t in stamps.items():  # finished chunks were not recomputed
        assert p.stat().st_mtime_ns == t
    assert not list(out.glob("embed/chunks-*/.*"))  # no stray temporary files


def test_cli_errors_are_one_line_exit_2(tmp_path: Path, curation_inputs: dict,
                                        random_export: Path, repo_root: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", curation_inputs, random_export, tmp_path / "w")
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    for args, needle in ((["run", str(cfg), "dedup.treshold=0.5"], "dedup.threshold"),
                         (["embed", str(cfg), "embed.model=/nonexistent/model"], "/nonexistent"),
                         (["dedup", str(cfg), f"out={tmp_path / 'fresh'}"], "embed"),
                         (["embed", str(cfg), "--part", "3/2"], "--part")):
        proc = subprocess.run([sys.executable, "-m", "curation.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if "dinosys-curate: error" in ln]
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_retrieval_cap_and_balancing_through_cli(tmp_path: Path, curation_inputs: dict,
                                                 random_export: Path) -> None:
    out = tmp_path / "work"
    cfg = write_config(tmp_path / "c.yaml", curation_inputs, random_export, out, **{
        "retrieve.queries": [{"path": str(curation_inputs["eval"]), "name": "queries"}],
        "retrieve.mode": "both", "retrieve.k": 6, "retrieve.min_queries": 0,
        "retrieve.per_cluster": 4, "retrieve.per_source_cap": 3, "cluster.target_size": 5})
    assert main(["run", str(cfg)]) == 0
    m = pq.read_table(out / "shards" / "manifest.parquet").to_pydict()
    kept = [i for i, s in enumerate(m["status"]) if s == "kept"]
    assert 0 < len(kept) <= 5
    assert all(m["selection_reason"][i].startswith("retrieval:") for i in kept)
    per_source: dict[str, int] = {}
    for i in kept:
        per_source[m["source"][i]] = per_source.get(m["source"][i], 0) + 1
    assert max(per_source.values()) <= 3
    reasons = set(m["reason"])
    assert "not_retrieved" in reasons and "retrieval_source_cap" in reasons
    assert "queries" in m["source"] and "query" in m["role"]
    summary = json.loads((out / "retrieve" / "DONE.json").read_text())["summary"]
    assert summary["selected"] == len(kept) and summary["capped"] > 0


def test_copy_embed_serves_dedup_and_embed_the_rest(tmp_path: Path, curation_inputs: dict,
                                                    random_export: Path) -> None:
    """``copy_embed``: a second model for dedup and decontamination (LVD-142M's SSCD), while
    ``embed`` serves clustering; each re-runs only when its own config changes."""
    copy = {"model": "builtin:copy_detector", "img_size": 48, "batch_size": 4, "chunk_size": 8,
            "num_workers": 0}
    thresholds = {"dedup.threshold": 0.8, "dedup.decontam_threshold": 0.8}
    split = tmp_path / "split"
    cfg = write_config(tmp_path / "split.yaml", curation_inputs, random_export, split,
                       copy_embed=copy, **thresholds)
    assert main(["run", str(cfg)]) == 0
    main_dim = np.load(split / "embed" / "embeddings.npy").shape[1]
    assert np.load(split / "embed_copy" / "embeddings.npy").shape[1] == 256 != main_dim
    assert np.load(split / "cluster" / "centroids_0.npy").shape[1] == main_dim
    # dedup is what a run with the copy model as its only model gives
    ref = tmp_path / "ref"
    ref_cfg = write_config(tmp_path / "ref.yaml", curation_inputs, random_export, ref,
                           **{f"embed.{k}": v for k, v in copy.items()}, **thresholds)
    assert main(["run", str(ref_cfg)]) == 0
    a, b = (pq.read_table(d / "dedup" / "pool.parquet").to_pydict() for d in (split, ref))
    assert a == b
    assert 0 < sum(not k for k in a["keep"]) < len(a["keep"])  # the copy model found copies
    # a copy_embed change re-runs embed_copy and dedup, never the main embedding
    stamp = (split / "embed" / "DONE.json").stat().st_mtime_ns
    copy_stamp = (split / "embed_copy" / "DONE.json").stat().st_mtime_ns
    assert main(["run", str(cfg), "copy_embed.img_size=40"]) == 0
    assert (split / "embed" / "DONE.json").stat().st_mtime_ns == stamp
    assert (split / "embed_copy" / "DONE.json").stat().st_mtime_ns != copy_stamp
    html = (split / "shards" / "curation_report.html").read_text()
    assert "copy model for dedup" in html and "embed_copy" in html
