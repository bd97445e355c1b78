"""Random-access training sources: image folders, file lists and indexed WebDataset shards.

Every source is a list of samples addressed by an integer index, grouped into "units" (a shard,
or a block of files) that the epoch order shuffles as a whole before mixing samples inside a
window of units. Shards are indexed once (tar member offsets) so a sample is one seek + read.
A :class:`Sample` carries every member: the image, the ``.txt`` caption, the ``.cls`` label and
the ``.json`` metadata (files on disk: sidecars with the image's stem, ``a/b.jpg`` ->
``a/b.txt``, ``a/b.json``; a folder's class index is the label).

:func:`source_kind` and :func:`expand_shards` are the one set of rules for what a path is and
which shards a pattern names (training, curation ingest and evaluation use them).
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
from omegaconf import MISSING
from webdataset.tariterators import base_plus_ext

from dinosys.atomic import write_atomic
from dinosys.config import Section, check_choice
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
class DataSourceConfig(Section):
    """One input: an image folder, a file list (.txt), or WebDataset shards (brace pattern)."""

    path: str = MISSING
    weight: float = 1.0
    kind: str = "auto"  # auto, folder, list, shards

    def validate(self) -> None:
        check_choice(self.kind, ("auto", "folder", "list", "shards"), "data.sources.kind")


@dataclass
class Sample:
    """One sample with every member: encoded image bytes, label (-1 if none), caption (None if
    none), JSON metadata (None if none) and where it came from (for logs). ``text_error`` says
    why a caption that exists could not be read (not UTF-8); ``text`` is None then."""

    image: bytes
    label: int
    where: str
    text: str | None = None
    meta: dict | None = None
    text_error: str | None = None


def _caption(raw: bytes | None) -> dict[str, str | None]:
    """``text`` / ``text_error`` fields of a Sample from a raw caption member."""
    if raw is None:
        return {"text": None}
    try:
        return {"text": raw.decode("utf-8").strip()}
    except UnicodeDecodeError as exc:
        return {"text": None, "text_error": f"caption is not UTF-8 (byte {exc.start})"}


def _meta(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None  # unreadable provenance must not cost the image
    return value if isinstance(value, dict) else None


def _sidecar(path: str, ext: str) -> bytes | None:
    try:
        with open(os.path.splitext(path)[0] + ext, "rb") as fh:
            return fh.read()
    except OSError:
        return None


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

    def read(self, index: int) -> Sample:
        path = self.paths[index]
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise BadImageError("read_error", f"{path}: {exc.strerror}") from exc
        return Sample(data, int(self.labels[index]), path, **_caption(_sidecar(path, ".txt")),
                      meta=_meta(_sidecar(path, ".json")))


@dataclass
class ShardIndex:
    """One shard's samples in tar order: key, label and the (offset, size) of the image,
    caption (.txt) and metadata (.json) members (None where absent); and the byte ranges of
    the shard that hold no readable member (``(offset, length, reason)``)."""

    keys: list[str]
    image: list[tuple[int, int] | None]
    labels: list[int]
    damage: list[tuple[int, int, str]] = field(default_factory=list)
    text: list[tuple[int, int] | None] = field(default_factory=list)
    meta: list[tuple[int, int] | None] = field(default_factory=list)

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
    text: list[tuple[int, int] | None] = []
    meta: list[tuple[int, int] | None] = []
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
                    text.append(None)
                    meta.append(None)
                i = pos[key]
                if ext in IMAGE_FIELDS and image[i] is None:
                    image[i] = (member.offset_data, member.size)
                elif ext == "txt":
                    text[i] = (member.offset_data, member.size)
                elif ext == "json":
                    meta[i] = (member.offset_data, member.size)
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
                       [(d.offset, d.length, d.reason) for d in scan.damage], text, meta)
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
        members = {name: [tuple(m) if m is not None else None for m in data[name]]
                   for name in ("image", "text", "meta")}
        damage = [(int(o), int(n), str(r)) for o, n, r in data["damage"]]
        return ShardIndex(list(data["keys"]), labels=list(data["labels"]), damage=damage,
                          **members)  # type: ignore[arg-type]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache, or one written before damage / every member was recorded: scan again
    index = index_shard(path)
    try:
        write_atomic(cache, json.dumps({"shard": os.path.abspath(path), "keys": index.keys,
                                        "image": index.image, "labels": index.labels,
                                        "damage": index.damage, "text": index.text,
                                        "meta": index.meta}))
    except OSError as exc:  # a read-only home is fine: just no cache
        logger.debug("cannot cache the index of %s: %s", path, exc)
    return index


def source_kind(path: str, kind: str = "auto") -> str:
    """What a data path is: ``"shards"``, ``"list"`` or ``"folder"`` (``kind`` other than
    ``auto`` wins). Shards: a brace pattern, a ``.tar`` or a folder holding ``.tar`` files and no
    image files beside them; list: a ``.txt`` file; folder: any other directory. UserError for a
    path that is none of these."""
    if kind != "auto":
        check_choice(kind, ("folder", "list", "shards"), "data.sources.kind")
        return kind
    p = Path(path)
    if "{" in path or path.endswith(".tar"):
        return "shards"
    if path.endswith(".txt") and p.is_file():
        return "list"
    if p.is_dir():
        entries = list(p.iterdir())
        has_tars = any(e.suffix == ".tar" and e.is_file() for e in entries)
        has_images = any(e.is_file() and e.suffix.lower().lstrip(".") in IMAGE_FIELDS
                         for e in entries)
        return "shards" if has_tars and not has_images else "folder"
    raise UserError(f"data source '{path}' is not an image folder, a .txt file list or .tar "
                    "shards (no such file or directory?)")


def expand_shards(pattern: str) -> list[str]:
    """The shard files a pattern names, in order: a brace pattern
    (``dir/{000000..000009}.tar``), one .tar, or a folder of .tar files. UserError when one is
    missing."""
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

    def _member(self, fh, span: tuple[int, int] | None, where: str) -> bytes | None:  # noqa: ANN001
        if span is None:
            return None
        try:
            fh.seek(span[0])
            return fh.read(span[1])
        except OSError as exc:
            raise BadImageError("read_error", f"{where}: {exc}") from exc

    def read(self, index: int) -> Sample:
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
        data = self._member(fh, member, where)
        return Sample(data, idx.labels[local], where,  # type: ignore[arg-type]
                      **_caption(self._member(fh, idx.text[local], where)),
                      meta=_meta(self._member(fh, idx.meta[local], where)))


def check_source(cfg: DataSourceConfig) -> str:
    """The source's kind, after checking that what it names exists (every shard of a pattern,
    the list file, the folder): what :func:`build_source` would find missing, found before any
    model is built or file written. UserError naming the missing path."""
    path = str(cfg.path)
    kind = source_kind(path, cfg.kind)
    if kind == "shards":
        expand_shards(path)
    elif kind == "list" and not Path(path).is_file():
        raise UserError(f"data source file list not found: {path}")
    elif kind == "folder" and not Path(path).is_dir():
        raise UserError(f"image folder not found: {path}")
    return kind


def build_source(cfg: DataSourceConfig):  # noqa: ANN201 - FileSource | ShardSource
    """The source a DataSourceConfig names (see :func:`source_kind`)."""
    path = str(cfg.path)
    kind = source_kind(path, cfg.kind)
    if kind == "shards":
        return ShardSource(path, path)
    if kind == "list":
        return FileSource(path, read_file_list(path))
    return FileSource(path, ImageFolder(path, allow_flat=True).samples)
