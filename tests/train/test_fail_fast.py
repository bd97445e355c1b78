"""A data source that does not exist is reported before a model is built and before anything is
written: no runs/<name>/ is left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _train(cwd: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dinosys.cli", "train", "mnist_tiny_cpu",
                           *overrides], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env)


@pytest.mark.parametrize("what", ["shards", "folder", "list"])
def test_missing_data_source_fails_before_models_and_run_dir(tmp_path, tiny_args, what) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "000000.tar").write_bytes(b"")  # the first shard exists, the second does not
    source, message = {
        "shards": (f"{shards}/{{000000..000001}}.tar",
                   f"shard not found: {shards}/000001.tar"),
        "folder": (str(tmp_path / "no_such_folder"), "not found"),
        "list": (str(tmp_path / "missing_list.txt"), "not found"),
    }[what]
    res = _train(tmp_path, tiny_args(f"data.sources=[{{path: '{source}'}}]"))
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("dinosys: error: ") and message in last, last
    assert not (tmp_path / "runs").exists()  # no runs/<name>/config.yaml left behind
    assert "layout:" not in res.stderr and "intra-op threads" not in res.stderr  # nothing built
