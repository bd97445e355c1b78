"""Export files are readable by others, and a killed export leaves nothing behind for good
(issue 18, items 10 and 12)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dinosys.atomic import atomic_directory
from dinosys.export import save_native
from dinosys.export.exporter import export_model

REPO = Path(__file__).resolve().parents[2]

_KILLED_EXPORT = """
import sys, time
from dinosys.export import exporter
from dinosys.models import create_backbone

def hang(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(600)

exporter.check_native = hang  # the native files are written; the check never ends
exporter.export_model(create_backbone("vit_tiny", layerscale_init=None), sys.argv[1], ["native"])
"""


@pytest.fixture()
def umask_022():  # type: ignore[no-untyped-def]
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_export_is_0755_and_0644(umask_022, tmp_path: Path, randomized) -> None:
    out = tmp_path / "model"
    export_model(randomized("vit_tiny", layerscale_init=None), out, ["native"])
    assert _mode(out) == 0o755
    for name in ("model.safetensors", "config.json", "README.md"):
        assert _mode(out / name) == 0o644, name


def test_atomic_directory_gives_plain_modes(umask_022, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        fd = os.open(tmp / "sub" / "secret.bin", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    assert (_mode(out), _mode(out / "sub"), _mode(out / "sub" / "secret.bin")) == (
        0o755, 0o755, 0o644)


def test_export_killed_midway_leaves_no_temp_folder_for_good(tmp_path: Path, randomized) -> None:
    out = tmp_path / "model"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORT, str(out)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.tmp-"), left  # what a kill leaves
    # a live writer's temp folder (this process) is not touched by another export
    live = tmp_path / f".model.tmp-{os.uname().nodename}@{os.getpid()}-abc"
    live.mkdir()
    save_native(randomized("vit_tiny", seed=2), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "model"])
