"""Atomic, reproducible WebDataset shard writing: ``{prefix}000000.tar`` ... plus ``sizes.json``.

Each shard is written under a hidden temporary name and renamed into place when it is complete,
so a reader (or a crashed writer) never sees half a shard under a real shard name. Tar headers
are fixed (mtime, owner, mode) and every value is encoded with fixed settings, so the same samples
give the same bytes. ``sizes.json`` (``{"<shard>.tar": n_samples}``) is written atomically on a
clean close, merged with the entries of other prefixes (and of this prefix's shards below
``start_index``, for a resumed writer) in the same directory; it is not written when the ``with``
block fails, so an interrupted output never looks complete.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image

from dinosys.atomic import write_atomic

if TYPE_CHECKING:
    from webdataset import TarWriter

logger = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
SIZES_LOCK = ".sizes.json.lock"
TAR_BLOCK = 512
_FIELD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_field(field: str, value: Any) -> bytes:
    """Encode one sample field to bytes with fixed settings (same input, same bytes).

    bytes-like values are stored as they are, ``str`` as UTF-8, ``int`` as decimal text (``cls``),
    ``dict``/``list`` as sorted-key JSON, and PIL images or uint8 arrays as the image format the
    field's extension names (png: lossless, jpg: quality 95, webp: lossless).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"field '{field}': refusing to store a bool; pass an int or text")
    if isinstance(value, (int, np.integer)):
        return str(int(value)).encode("ascii")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ext = field.rsplit(".", 1)[-1].lower()
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8:
            raise ValueError(f"field '{field}': image arrays must be uint8, got {value.dtype}")
        value = Image.fromarray(value)
    if isinstance(value, Image.Image):
        fmt = _IMAGE_FORMATS.get(ext)
        if fmt is None:
            raise ValueError(f"field '{field}': cannot store an image under extension '{ext}'")
        return encode_image(value, fmt)
    raise ValueError(f"field '{field}': cannot encode a {type(value).__name__}")


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    """Encode a PIL image with fixed encoder settings and no metadata."""
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, format="PNG", compress_level=6, optimize=False)
    elif fmt == "JPEG":
        image.convert("RGB").save(buf, format="JPEG", quality=95, optimize=False,
                                  progressive=False, subsampling=0)
    elif fmt == "WEBP":
        image.save(buf, format="WEBP", lossless=True, quality=100, method=4, exact=True)
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return buf.getvalue()


def _tar_bytes(payload: Mapping[str, bytes]) -> int:
    """Bytes a sample takes in a tar: one header block per member plus data padded to blocks."""
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for v in payload.values())


def validate_key(key: Any) -> str:
    """A sample key must be non-empty text without dots (WebDataset splits names at the first
    dot) or slashes, and without a leading underscore."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample '__key__' must be a non-empty string, got {key!r}")
    if "." in key or "/" in key or "\\" in key or key.startswith("_") or key.strip() != key:
        raise ValueError(f"sample key {key!r} must not contain dots, slashes, surrounding "
                         "spaces or a leading underscore")
    return key


class ShardWriter:
    """Write samples into WebDataset tar shards ``out_dir/{prefix}{index:06d}.tar``.

    A sample is a dict with ``__key__`` (no dots) and one entry per field, named by extension
    (``png``, ``jpg``, ``webp``, ``json``, ``txt``, ``cls``, ...). A new shard starts when the
    current one holds ``max_count`` samples or would exceed about ``max_size`` bytes (a single
    larger sample gets a shard of its own). Fields named ``__*`` (WebDataset metadata such as
    ``__url__``) are not stored. Shards of this prefix numbered from ``start_index`` on that
    already exist are an error unless ``overwrite`` (then they are deleted first); a writer with
    ``start_index=n`` resumes an output after its first n shards. Use as a context manager;
    :meth:`close` returns ``{shard_name: n_samples}`` for the shards it wrote.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "", max_count: int = 10_000,
                 max_size: int = 1 << 30, start_index: int = 0, mtime: int = 0,
                 overwrite: bool = False) -> None:
        if max_count < 1 or max_size < 1:
            raise ValueError("max_count and max_size must be >= 1")
        if "/" in prefix or "." in prefix:
            raise ValueError(f"shard prefix {prefix!r} must not contain '/' or '.'")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_count = max_count
        self.max_size = max_size
        self.mtime = int(mtime)  # an int: a float mtime adds a PAX header to every member
        self._start_index = start_index
        self._name_re = re.compile(re.escape(prefix) + r"(\d{6})\.tar$")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._check_existing(overwrite)
        self.sizes: dict[str, int] = {}
        self.total = 0
        self._index = start_index
        self._writer: TarWriter | None = None
        self._file: BinaryIO | None = None
        self._tmp_path: Path | None = None
        self._count = 0
        self._bytes = 0
        self._last_key: str | None = None
        self._closed = False

    # ------------------------------------------------------------------ public

    @property
    def shards(self) -> list[Path]:
        """Paths of the shards completed so far, in order."""
        return [self.out_dir / name for name in self.sizes]

    def shard_name(self, index: int) -> str:
        """The file name of shard number ``index``."""
        return f"{self.prefix}{index:06d}.tar"

    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample; starts a new shard first when the current one is full."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        key = validate_key(sample.get("__key__"))
        if key == self._last_key:
            raise ValueError(f"sample key {key!r} repeats the previous sample's key")
        payload: dict[str, bytes] = {}
        for field, value in sample.items():
            if isinstance(field, str) and field.startswith("__"):  # __key__, __url__ (read back)
                continue
            if not isinstance(field, str) or not _FIELD_RE.match(field):
                raise ValueError(f"sample {key!r}: bad field name {field!r} (use e.g. png, json)")
            payload[field] = encode_field(field, value)
        if not payload:
            raise ValueError(f"sample {key!r} has no fields besides __key__")
        size = _tar_bytes(payload)
        if self._writer is not None and (self._count >= self.max_count
                                         or self._bytes + size > self.max_size):
            self._finish_shard()
        if self._writer is None:
            self._start_shard()
        assert self._writer is not None
        self._writer.write({"__key__": key, **payload})
        self._count += 1
        self._bytes += size
        self.total += 1
        self._last_key = key

    def close(self) -> dict[str, int]:
        """Finish the last shard, write ``sizes.json`` atomically, return ``{shard: n}``."""
        if not self._closed:
            self._finish_shard()
            self._write_sizes()
            self._closed = True
        return dict(self.sizes)

    def abort(self) -> None:
        """Drop the shard in progress (completed shards stay; sizes.json is not written)."""
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self._writer = None
            if self._file is not None:
                self._file.close()
                self._file = None
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
            self._tmp_path = None
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------------ internals

    def _is_ours(self, name: str) -> bool:
        """A shard name this writer may (re)write: its prefix and an index >= start_index."""
        match = self._name_re.match(name)
        return match is not None and int(match.group(1)) >= self._start_index

    def _check_existing(self, overwrite: bool) -> None:
        existing = sorted(p for p in self.out_dir.iterdir() if self._is_ours(p.name))
        if existing and not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds shards named like "
                                  f"{existing[0].name}; pass overwrite=True or use a new directory")
        for path in existing:
            path.unlink()

    def _start_shard(self) -> None:
        name = self.shard_name(self._index)
        from webdataset import TarWriter  # imports torch: only when a shard is written

        self._tmp_path = self.out_dir / f".{name}.tmp-{os.getpid()}"
        # our own file object: webdataset's gopen would treat a "pipe:..." path as a command
        self._file = open(self._tmp_path, "wb")  # closed by _finish_shard or abort
        self._writer = TarWriter(self._file, user="", group="", mode=0o644, encoder=False,
                                 mtime=self.mtime)
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        if self._writer is None or self._tmp_path is None:
            return
        self._writer.close()
        self._writer = None
        assert self._file is not None
        with self._file:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file = None
        name = self.shard_name(self._index)
        os.replace(self._tmp_path, self.out_dir / name)
        self._tmp_path = None
        self.sizes[name] = self._count
        logger.debug("wrote shard %s (%d samples)", self.out_dir / name, self._count)
        self._index += 1

    def _write_sizes(self) -> None:
        """Merge this writer's shards into sizes.json, keeping other prefixes' entries."""
        path = self.out_dir / SIZES_FILE
        # writers of other prefixes may share the directory: merge under a lock (a file opened
        # for writing, so that flock also works on NFS)
        with open(self.out_dir / SIZES_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged: dict[str, int] = {}
            if path.exists():
                try:
                    merged = {k: int(v) for k, v in json.loads(path.read_text()).items()}
                except (ValueError, AttributeError) as exc:
                    raise ValueError(f"{path} is not a JSON object of shard sizes") from exc
            merged = {k: v for k, v in merged.items() if not self._is_ours(k)}
            merged.update(self.sizes)
            write_atomic(path, json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
