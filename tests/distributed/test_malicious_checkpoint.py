"""Nothing in a checkpoint runs code on load; a damaged one is one line (issue 18, items 1, 11).

A ``.metadata`` pickle with a ``__reduce__`` payload, planted in a run directory, is refused on
every read path (resume, export, eval, curation embed) before the payload runs.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dinosys.config import load_config, save_config
from dinosys.distributed.sharded_checkpoint import CheckpointManager, load_backbone_state
from dinosys.errors import UserError
from dinosys.train.tasks.ssl import SSLConfig

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this creates the marker file (what an attacker's shell command would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)


def _state() -> dict:
    torch.manual_seed(0)
    return {"teacher": Teacher(), "task": {"center": torch.zeros(3), "lr": 0.5}}


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A run directory: config.yaml and one committed checkpoint."""
    run = tmp_path / "run"
    save_config(load_config(SSLConfig, "mnist_tiny_cpu"), run)
    CheckpointManager(run / "checkpoints").save(1, _state(), {"seed": 0})
    return run


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / "step_00000001"


def _plant_metadata(run: Path, marker: Path) -> None:
    metadata_path = _ckpt(run) / ".metadata"
    with open(metadata_path, "rb") as fh:
        metadata = pickle.load(fh)  # our own, freshly written file
    metadata.storage_meta.save_id = _Payload(marker)  # nested: the unpickler meets it midway
    metadata_path.write_bytes(pickle.dumps(metadata))


def _one_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stdout[-500:], res.stderr[-3000:])
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_payload_in_metadata_is_refused_on_every_read_path(run: Path, tmp_path: Path) -> None:
    from curation.backbone import load_feature_model
    from dinosys.eval.models import load_eval_model
    from dinosys.export import load

    marker = tmp_path / "PWNED"
    _plant_metadata(run, marker)
    with open(_ckpt(run) / ".metadata", "rb") as fh:  # the planted file does run code
        pickle.load(fh)
    assert marker.exists()
    marker.unlink()

    refused = "refusing to load .metadata: it names posix.system"
    with pytest.raises(UserError, match=refused):  # resume
        CheckpointManager(run / "checkpoints").load(_ckpt(run), _state())
    for reader in (load_backbone_state, load, load_eval_model, load_feature_model):
        with pytest.raises(UserError, match=refused):  # export, eval, curation embed
            reader(str(run) if reader is load_feature_model else run)
    assert not marker.exists()

    res = _cli("dinosys.cli", "export", "--model", str(run), "--out", str(tmp_path / "exp"),
               cwd=tmp_path)
    _one_line(res, refused)
    assert not marker.exists() and not (tmp_path / "exp").exists()


def test_payload_in_a_saved_value_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    manager = CheckpointManager(tmp_path / "ckpt")
    state = _state()
    state["task"]["lr"] = _Payload(marker)  # saved as torch.save bytes inside a .distcp
    path = manager.save(1, state, {"seed": 0})
    assert not marker.exists()
    with pytest.raises(UserError, match="'task.lr' is not plain data"):
        manager.load(path, _state())
    assert not marker.exists()


def test_plain_values_still_load(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    path = manager.save(1, _state(), {"seed": 0})
    fresh = _state()
    fresh["task"]["lr"] = 0.0
    manager.load(path, fresh)
    assert fresh["task"]["lr"] == 0.5


@pytest.mark.parametrize("damage, needle", [
    ("garbage_metadata", ".metadata is damaged"),
    ("empty_metadata", ".metadata is damaged"),
    ("truncated_shard", "is damaged: a shard could not be read"),
    ("garbage_extra", "cannot read extra.json"),
])
def test_a_damaged_checkpoint_is_one_line(run: Path, tmp_path: Path, damage, needle) -> None:
    ckpt = _ckpt(run)
    if damage == "garbage_metadata":
        (ckpt / ".metadata").write_bytes(b"\x80\x04this is not a pickle" * 10)
    elif damage == "empty_metadata":
        (ckpt / ".metadata").write_bytes(b"")
    elif damage == "truncated_shard":
        shard = ckpt / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:200])
    else:
        (ckpt / "extra.json").write_text("{not json")
    with pytest.raises(UserError, match=needle):
        CheckpointManager(run / "checkpoints").load(ckpt, _state())
    if damage != "garbage_extra":  # export and eval read no extra.json
        res = _cli("dinosys.cli", "eval", "knn", "--model", str(run), "--train", str(tmp_path),
                   "--val", str(tmp_path), cwd=tmp_path)
        _one_line(res, needle)
