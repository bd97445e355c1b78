"""Random-access training sources: image folders, file lists and indexed WebDataset shards.

Every source is a list of samples addressed by an integer index, grouped into "units" (a shard,
or a block of files) that the epoch order shuffles as a whole before mixing samples inside a
window of units. Shards are indexed once (tar member offsets) so a sample is one seek + read.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from dinosys.atomic import write_atomic
from dinosys.config import DataSourceConfig
from dinosys.data.decode import BadImageError
from dinosys.data.folder import ImageFolder, read_file_list
from dinosys.data.tar_scan import Damage, scan_tar
from dinosys.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")
FILE_BLOCK = 256  # files per shuffle unit for folder and list sources
CACHE_ENV = "DINOSYS_CACHE"  # shard indexes go to $DINOSYS_CACHE/shard_index (~/.cache/dinosys)
_MAX_OPEN_SHARDS = 16


@dataclass
class RawSample:
    """Encoded image bytes, label (-1 if none) and where it came from (for logs)."""

    data: bytes
    label: int
    where: str


class FileSource:
    """Images on a file system: an image folder or a .txt file list."""

    kind = "files"

    def __init__(self, name: str, items: list[tuple[Path, int]]) -> None:
        self.name = name
        self.paths = [str(p) for p, _ in items]
        self.labels = np.asarray([label for _, label in items], dtype=np.int64)
        self.unit_sizes = np.full(-(-len(items) // FILE_BLOCK), FILE_BLOCK, dtype=np.int64)
        if len(items) % FILE_BLOCK:
            self.unit_sizes[-1] = len(items) % FILE_BLOCK
        self.shuffle_items = True  # random access is cheap: units are blocks of a permutation

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> RawSample:
        path = self.paths[index]
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise BadImageError("read_error", f"{path}: {exc.strerror}") from exc
        return RawSample(data, int(self.labels[index]), path)


@dataclass
class ShardIndex:
    """One shard's samples in tar order: key, image member (offset, size), label; and the byte
    ranges of the shard that hold no readable member (``(offset, length, reason)``)."""

    keys: list[str]
    image: list[tuple[int, int] | None]
    labels: list[int]
    damage: list[tuple[int, int, str]] = field(default_factory=list)

    def damage_text(self) -> str:
        """``garbage at offset 10240 (5120 bytes)``, ... (empty when the shard is sound)."""
        return ", ".join(Damage(*d).describe() for d in self.damage)


def index_shard(path: str) -> ShardIndex:
    """Scan a tar's headers once, strictly (no payload reads except tiny .cls fields).

    A damaged shard (garbage, cut short, empty, unreadable) is not an error: its readable
    members are indexed and the rest is listed in ``damage`` (and logged with its offset)."""
    keys: list[str] = []
    image: list[tuple[int, int] | None] = []
    labels: list[int] = []
    pos: dict[str, int] = {}
    try:
        scan = scan_tar(path)
        with open(path, "rb") as fh:
            for member in scan.members:
                split = base_plus_ext(member.name)
                if split[0] is None:
                    continue
                key, ext = split
                ext = ext.lower()
                if key not in pos:
                    pos[key] = len(keys)
                    keys.append(key)
                    image.append(None)
                    labels.append(-1)
                i = pos[key]
                if ext in IMAGE_FIELDS and image[i] is None:
                    image[i] = (member.offset_data, member.size)
                elif ext == "cls" and member.size < 64:
                    fh.seek(member.offset_data)
                    try:
                        labels[i] = int(fh.read(member.size).decode("ascii").strip())
                    except ValueError:
                        labels[i] = -1
    except OSError as exc:
        damage = [(0, 0, f"unreadable ({exc.strerror or exc})")]
        logger.warning("shard %s cannot be read (%s): its samples are skipped and counted",
                       path, exc.strerror or exc)
        return ShardIndex([], [], [], damage)
    index = ShardIndex(keys, image, labels,
                       [(d.offset, d.length, d.reason) for d in scan.damage])
    if index.damage:
        logger.warning("shard %s is damaged: %s; %d samples readable, the ones stored there are "
                       "skipped and counted", path, index.damage_text(), len(keys))
    return index


def _index_cache_file(path: str) -> Path:
    st = os.stat(path)
    ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dinosys")
    return root / "shard_index" / f"{hashlib.sha1(ident).hexdigest()}.json"


def load_shard_index(path: str) -> ShardIndex:
    """The shard's index from the cache (keyed by path, size and mtime), else scan and cache it.

    Every rank and DataLoader worker needs the index of the shards it reads; the cache makes the
    header scan happen once per shard version instead of once per process.
    """
    try:
        cache = _index_cache_file(path)
    except OSError as exc:
        raise UserError(f"cannot read shard {path}: {exc.strerror}") from exc
    try:
        data = json.loads(cache.read_text())
        image = [tuple(m) if m is not None else None for m in data["image"]]
        damage = [(int(o), int(n), str(r)) for o, n, r in data["damage"]]
        return ShardIndex(list(data["keys"]), image, list(data["labels"]),  # type: ignore[arg-type]
                          damage)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache, or one written before damage was recorded: scan again
    index = index_shard(path)
    try:
        write_atomic(cache, json.dumps({"shard": os.path.abspath(path), "keys": index.keys,
                                        "image": index.image, "labels": index.labels,
                                        "damage": index.damage}))
    except OSError as exc:  # a read-only home is fine: just no cache
        logger.debug("cannot cache the index of %s: %s", path, exc)
    return index


def expand_shards(pattern: str) -> list[str]:
    """Brace pattern (``dir/{000000..000009}.tar``), one .tar, or a folder of .tar files."""
    p = Path(pattern)
    if "{" not in pattern and p.is_dir():
        shards = sorted(str(x) for x in p.glob("*.tar"))
    else:
        shards = list(braceexpand(pattern))
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards or missing:
        what = missing[0] if missing else pattern
        raise UserError(f"shard not found: {what} (from data source '{pattern}')")
    return shards


def _sizes_from_json(shards: list[str]) -> list[int | None]:
    out: list[int | None] = []
    cache: dict[Path, dict] = {}
    for shard in shards:
        folder = Path(shard).parent
        if folder not in cache:
            try:
                cache[folder] = json.loads((folder / "sizes.json").read_text())
            except (OSError, ValueError):
                cache[folder] = {}
        value = cache[folder].get(Path(shard).name)
        out.append(int(value) if isinstance(value, int) else None)
    return out


class ShardSource:
    """WebDataset shards read by index: counts from sizes.json (else a header scan)."""

    kind = "shards"

    def __init__(self, name: str, pattern: str) -> None:
        self.name = name
        self.shards = expand_shards(pattern)
        sizes = _sizes_from_json(self.shards)
        self._index: dict[int, ShardIndex] = {}
        for i, size in enumerate(sizes):
            if size is None:  # no sizes.json entry: index now (the index is kept)
                self._index[i] = load_shard_index(self.shards[i])
                sizes[i] = len(self._index[i].keys)
        self.unit_sizes = np.asarray(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.unit_sizes)]).tolist()
        self.shuffle_items = False  # keep tar order inside a unit; windows mix samples
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:  # spawned DataLoader workers: open files do not pickle
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def _handle(self, shard: int):  # noqa: ANN202 - a binary file object
        if self._pid != os.getpid():  # forked worker: never share the parent's file offsets
            self._files, self._pid = {}, os.getpid()
        fh = self._files.pop(shard, None)
        if fh is None:
            if len(self._files) >= _MAX_OPEN_SHARDS:
                oldest = next(iter(self._files))
                self._files.pop(oldest).close()  # type: ignore[attr-defined]
            fh = open(self.shards[shard], "rb")  # noqa: SIM115 - cached handle
        self._files[shard] = fh  # re-insert: most recently used last
        return fh

    def read(self, index: int) -> RawSample:
        shard = bisect.bisect_right(self.starts, index) - 1
        local = index - self.starts[shard]
        idx = self._index.get(shard)
        if idx is None:
            idx = self._index[shard] = load_shard_index(self.shards[shard])
        where = f"{self.shards[shard]}"
        if local >= len(idx.keys):
            expected = int(self.unit_sizes[shard])
            if idx.damage:  # sizes.json counts the samples the damage took
                raise BadImageError("damaged_shard", f"{where}: {idx.damage_text()}; sample "
                                    f"{local} of {expected} lost ({len(idx.keys)} readable)")
            raise BadImageError("read_error", f"{where}: no sample {local} (stale sizes.json?)")
        where = f"{where}:{idx.keys[local]}"
        member = idx.image[local]
        if member is None:
            raise BadImageError("no_image_field", where)
        fh = self._handle(shard)
        try:
            fh.seek(member[0])  # type: ignore[attr-defined]
            data = fh.read(member[1])  # type: ignore[attr-defined]
        except OSError as exc:
            raise BadImageError("read_error", f"{where}: {exc}") from exc
        return RawSample(data, idx.labels[local], where)


def build_source(cfg: DataSourceConfig):  # noqa: ANN201 - FileSource | ShardSource
    """The source a DataSourceConfig names (kind auto: braces/.tar -> shards, .txt -> list)."""
    path, kind = str(cfg.path), cfg.kind
    if kind == "auto":
        p = Path(path)
        if "{" in path or path.endswith(".tar") or (p.is_dir() and any(p.glob("*.tar"))):
            kind = "shards"
        elif path.endswith(".txt"):
            kind = "list"
        else:
            kind = "folder"
    if kind == "shards":
        return ShardSource(path, path)
    if kind == "list":
        return FileSource(path, read_file_list(path))
    return FileSource(path, ImageFolder(path, allow_flat=True).samples)
