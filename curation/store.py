"""Atomic files and stage done-markers: every stage output appears whole or not at all, and a
stage whose marker matches the digest of its inputs and config is skipped on re-run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dinosys.atomic import atomic_file, replace_directory, write_atomic


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename."""
    with atomic_file(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


class NpyWriter:
    """An ``.npy`` of known shape written block by block with plain writes (a memory map would
    keep every written page in the writer's resident set), renamed into place on close."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.shape, self.dtype = Path(path), shape, np.dtype(dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.fh = open(self.tmp, "wb")
        np.lib.format.write_array_header_1_0(
            self.fh, {"descr": self.dtype.str, "fortran_order": False, "shape": shape})
        self.rows = 0

    def write(self, block: np.ndarray) -> None:
        """Append rows."""
        self.fh.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += len(block)

    def close(self) -> None:
        """Check the row count, fsync, rename into place."""
        try:
            if self.rows != self.shape[0]:
                raise RuntimeError(f"{self.path}: wrote {self.rows} rows of {self.shape[0]}")
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.fh.close()
            self.tmp.unlink(missing_ok=True)
            raise


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """Load an array written by :func:`save_npy` (never unpickles)."""
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def save_table(path: Path, table: pa.Table | dict[str, Any]) -> None:
    """Write a parquet table atomically (a dict of columns is converted first)."""
    if isinstance(table, dict):
        table = pa.table(table)
    with atomic_file(path, "wb") as fh:
        pq.write_table(table, fh)


def load_table(path: Path) -> pa.Table:
    """Read a parquet table."""
    return pq.read_table(path)


def save_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a fully written temporary directory into place (replacing an older one)."""
    replace_directory(tmp_dir, final)


def digest(*parts: Any) -> str:
    """A stable hex digest of JSON-able parts (configs, upstream digests, file stats)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Stage:
    """The done-marker of one stage under ``work/<name>/``: ``DONE.json`` holds its digest."""

    def __init__(self, work: Path, name: str) -> None:
        self.name = name
        self.dir = Path(work) / name
        self.marker = self.dir / "DONE.json"

    def is_done(self, key: str) -> bool:
        """True when the stage finished with the same inputs/config digest."""
        if not self.marker.is_file():
            return False
        try:
            return json.loads(self.marker.read_text()).get("digest") == key
        except (OSError, json.JSONDecodeError):
            return False

    def done_digest(self) -> str | None:
        """The digest the stage last finished with (None if never)."""
        try:
            return json.loads(self.marker.read_text()).get("digest")
        except (OSError, json.JSONDecodeError):
            return None

    def mark_done(self, key: str, summary: dict | None = None) -> None:
        """Write the marker last, after all outputs are in place."""
        save_json(self.marker, {"digest": key, "stage": self.name, "summary": summary or {}})

    def summary(self) -> dict:
        """The summary recorded with the marker."""
        return json.loads(self.marker.read_text()).get("summary", {})

    def invalidate(self) -> None:
        """Remove the marker (outputs are rewritten by the next run)."""
        self.marker.unlink(missing_ok=True)
