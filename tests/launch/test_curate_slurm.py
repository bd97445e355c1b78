"""Curation on the real local Slurm cluster: one array per split stage chained with afterok,
then the shard merge and the report; and the same chain with --local."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch import slurm

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"


@pytest.fixture()
def curation_config(tmp_path, builtin_data, tiny_model) -> Path:
    """A tiny curation of the embedded photos + digits with a small random-weight backbone."""
    path = tmp_path / "curate.yaml"
    path.write_text(f"""name: launchcur
out: {tmp_path / 'work'}
sources:
  - {{path: {builtin_data / 'photos'}, name: photos}}
  - {{path: {builtin_data / 'digits' / 'val'}, name: digits}}
embed: {{model: {tiny_model}, img_size: 28, batch_size: 64, chunk_size: 64,
        num_workers: 0}}
dedup: {{k: 8, threshold: 0.999}}
cluster: {{levels: [8, 2], n_iter: 5}}
progress: false
""")
    return path


@pytest.mark.slurm
@pytest.mark.slow
def test_curation_array_then_merge_and_stages(tmp_path, curation_config) -> None:
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, str(SUBMIT), "curate", "--parts", "2", "--partition",
                          "debug", "--timeout-min", "10", "--out", str(run), "--",
                          str(curation_config)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.splitlines()[-1])
    ids = info["job_ids"]
    assert len(ids) == 7  # ingest, embed, dedup, cluster, retrieve, shard arrays, then run
    for before, after in zip(ids, ids[1:]):
        assert slurm.job_fields(after).get("Dependency", "").startswith(f"afterok:{before}")
    try:
        fields = slurm.wait_for_job(ids[-1], timeout_s=600)
    finally:
        subprocess.run(["scancel", *ids], timeout=30)
    logs = sorted((run / "submitit").glob("*_log.err"))
    assert fields["JobState"] == "COMPLETED", [p.read_text()[-2000:] for p in logs]
    for array_id in ids[:-1]:
        for index in (0, 1):
            element = slurm.job_fields(f"{array_id}_{index}")
            assert element.get("JobState") == "COMPLETED", element
            out = (run / "submitit" / f"{array_id}_{index}_0_log.out").read_text()
            assert f'"part": "{index}/2"' in out  # the stage's summary line
    work = tmp_path / "work"
    chunks = sorted(p.name for p in (work / "embed").glob("chunks-*/chunk-*.json"))
    assert len(chunks) == 6  # 370 images in chunks of 64, shared by the two parts
    assert (work / "embed" / "embeddings.npy").is_file()
    assert list((work / "shards").glob("*.tar")) and (work / "shards" / "sizes.json").is_file()
    assert (work / "shards" / "curation_report.html").is_file()
    sub = json.loads((run / "submission" / "job.json").read_text())
    assert [j["stage"] for j in sub["jobs"]] == ["ingest", "embed", "dedup", "cluster",
                                                 "retrieve", "shard", "run"]
    assert "#SBATCH --array=0-1%2" in (run / "submission" / "sbatch-embed.sh").read_text()
    assert "afterok:" in (run / "submission" / "sbatch-run.sh").read_text()
    for stage in ("ingest", "knn", "cluster", "retrieve"):
        assert (work / stage / "parts" / "2" / "part-1.json").is_file()


@pytest.mark.slow
def test_curation_local_chain_equals_one_process(tmp_path, curation_config) -> None:
    """`submit.py curate --local --parts 2`: the same arrays as local tasks; the manifest and
    the shard bytes equal a one-process `dinosys-curate run`."""
    import pyarrow.parquet as pq

    from curation.cli import main

    run = tmp_path / "run"
    res = subprocess.run([sys.executable, str(SUBMIT), "curate", "--local", "--parts", "2",
                          "--out", str(run), "--", str(curation_config)],
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.splitlines()[-1])
    assert info["stages"] == ["ingest", "embed", "dedup", "cluster", "retrieve", "shard", "run"]
    ref = tmp_path / "ref"
    assert main(["run", str(curation_config), f"out={ref}"]) == 0
    work = tmp_path / "work"
    assert (pq.read_table(work / "shards" / "manifest.parquet").to_pydict()
            == pq.read_table(ref / "shards" / "manifest.parquet").to_pydict())
    tars = sorted(p.name for p in (ref / "shards").glob("*.tar"))
    assert tars and tars == sorted(p.name for p in (work / "shards").glob("*.tar"))
    for name in tars:
        assert (work / "shards" / name).read_bytes() == (ref / "shards" / name).read_bytes()
