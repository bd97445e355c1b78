"""Atomic outputs: a file or a directory appears whole or not at all.

Everything dinosys writes for users or for a later resume (configs, metrics rewrites, JSON
summaries, exported models, curation tables) goes through these helpers: write beside the
target, flush to disk, then rename over it, so a reader or a crash never sees half of it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Yield an open temporary file beside ``path`` that replaces ``path`` when the block ends
    without an exception (flushed and fsynced first); on an exception it is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs must stay readable by others
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)


def replace_directory(tmp_dir: Path, final: Path) -> None:
    """Move a fully written directory into place, replacing an older ``final`` if there is one
    (the old one is renamed away first, then deleted)."""
    tmp_dir, final = Path(tmp_dir), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        os.replace(tmp_dir, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, old / "x")
    os.replace(tmp_dir, final)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(root: Path) -> None:
    """Give ``root`` and everything under it the modes of a plain output: 0777/0666 less the
    umask (0755/0644 usually). ``mkdtemp`` makes 0700 and some writers 0600, which would keep
    another user (a downstream team) from reading an export."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _temp_name_prefix(name: str) -> str:
    return f".{name}.tmp-"


def _owner_is_gone(path: Path, prefix: str) -> bool:
    """Whether the temp folder ``path`` (named ``<prefix><host>-<pid>-<random>``) belongs to a
    process of this host that no longer runs (killed mid-write)."""
    host, _, rest = path.name[len(prefix):].rpartition("@")
    pid_text = rest.split("-")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temps(out_dir: Path) -> list[Path]:
    """Delete the temp and old folders that killed writers of ``out_dir`` left beside it."""
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for prefix in (_temp_name_prefix(out_dir.name), f".{out_dir.name}.old-"):
        for path in out_dir.parent.glob(glob.escape(prefix) + "*"):
            if path.is_dir() and (prefix.endswith(".old-") or _owner_is_gone(path, prefix)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir`` that replaces ``out_dir`` when the block
    ends without an exception; on an exception it is deleted and ``out_dir`` is untouched.

    The result gets plain output modes (:func:`make_readable`). A writer killed with -9 leaves
    its temp folder (named after host and pid): the next writer of ``out_dir`` removes it.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    prefix = f"{_temp_name_prefix(out_dir.name)}{socket.gethostname()}@{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        yield tmp
        make_readable(tmp)
        replace_directory(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
