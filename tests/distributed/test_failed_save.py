"""A failed checkpoint save (disk full, read-only disk) leaves no temp folder, says what failed
in one line and keeps the previous checkpoint (issue 18, item 9)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter

from dinosys.distributed.sharded_checkpoint import CheckpointManager
from dinosys.errors import UserError


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Linear(256, 256)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 256)).sum().backward()
    optim.step()
    return {"student": model, "optim": optim}


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def _check_previous_intact(manager: CheckpointManager, saved: dict) -> None:
    assert manager.latest() == manager.root / "step_00000001"
    fresh = _state(seed=1)
    manager.load(manager.latest(), fresh)
    assert torch.equal(fresh["student"].weight, saved["student"].weight)


def test_injected_enospc_during_save(tmp_path: Path, monkeypatch) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    saved = _state()
    manager.save(1, saved)

    def full(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / "__0_0.distcp"))

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(UserError) as info:
        manager.save(2, saved)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    assert "__0_0.distcp" in message and "step_00000001 is intact" in message
    assert _leftovers(manager.root) == []
    _check_previous_intact(manager, saved)


@pytest.fixture()
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 4 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_and_read_only_disk_during_save(small_disk: Path) -> None:
    manager = CheckpointManager(small_disk / "ckpt")
    saved = _state()
    first = manager.save(1, saved)
    need = sum(p.stat().st_size for p in first.iterdir())
    ballast = small_disk / "ballast"
    stat = os.statvfs(small_disk)
    ballast.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - need // 2))

    with pytest.raises(UserError) as info:
        manager.save(2, saved)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message, message
    assert str(manager.root) in message and "step_00000001 is intact" in message
    assert _leftovers(manager.root) == []  # no temp folder holding the space
    _check_previous_intact(manager, saved)

    ballast.unlink()  # space again: the rerun saves at once
    assert manager.save(2, saved) == manager.root / "step_00000002"

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(UserError, match="Read-only file system"):
        manager.save(3, saved)
    assert manager.latest() == manager.root / "step_00000002"
