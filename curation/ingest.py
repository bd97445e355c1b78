"""Ingest: list the images of folders, file lists and WebDataset shards, hash their bytes
(sha256) and mark exact duplicates. Unreadable inputs are recorded with a reason, never fatal.

Shard members are located by byte offset, so later stages read one image without scanning tars.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from curation.config import SourceConfig
from dinosys.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
COLUMNS = ("id", "role", "source", "path", "member", "offset", "size", "sha256", "caption",
           "status", "reason", "dup_of")


@dataclass
class Item:
    """One image reference before hashing."""

    path: str
    member: str = ""  # tar member name ("" for a plain file)
    offset: int = -1  # byte offset of the member's data inside the tar
    size: int = -1
    caption: str = ""
    error: str = ""  # set when the input is already known to be unreadable


def _expand_shards(pattern: str) -> list[Path]:
    from braceexpand import braceexpand

    path = Path(pattern)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    return [Path(p) for p in braceexpand(pattern)]


def source_kind(src: SourceConfig) -> str:
    """Resolve ``kind: auto`` from the path."""
    if src.kind != "auto":
        return src.kind
    path = Path(src.path)
    if path.suffix == ".txt" and path.is_file():
        return "list"
    if path.suffix == ".tar" or "{" in src.path:
        return "shards"
    if path.is_dir():
        return "shards" if any(path.glob("*.tar")) and not _has_images(path) else "folder"
    raise UserError(f"source '{src.path}' is not a folder, a .txt file list or .tar shards; "
                    "check the path or set its kind")


def _has_images(path: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTS for p in path.rglob("*"))


def source_name(src: SourceConfig) -> str:
    """The name the manifest uses for a source."""
    if src.name:
        return src.name
    path = Path(src.path.split("{")[0].rstrip("/") or src.path)
    return path.stem if path.suffix in (".txt", ".tar") else path.name


def _folder_items(root: Path) -> Iterator[Item]:
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTS:
            yield Item(str(path))


def _list_items(list_file: Path) -> Iterator[Item]:
    try:
        lines = list_file.read_text().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read file list {list_file}: {exc.strerror}") from exc
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line)
        if not path.is_absolute():
            path = list_file.parent / path
        yield Item(str(path))


def _shard_items(pattern: str) -> Iterator[Item]:
    tars = _expand_shards(pattern)
    if not tars:
        raise UserError(f"no .tar shards match '{pattern}'")
    for tar_path in tars:
        try:
            tar = tarfile.open(tar_path, mode="r:")
        except (OSError, tarfile.TarError) as exc:
            yield Item(str(tar_path), error=f"unreadable shard: {exc}")
            continue
        with tar:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            try:
                for info in tar:
                    if not info.isfile():
                        continue
                    base = info.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    prefix = info.name[: len(info.name) - len(base)]
                    groups.setdefault(prefix + key, {})[ext.lower()] = info
            except tarfile.TarError as exc:
                yield Item(str(tar_path), error=f"truncated shard: {exc}")
            for members in groups.values():
                image = next((members[e] for e in ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
                              if e in members), None)
                if image is None:
                    continue
                caption = ""
                if "txt" in members:
                    fh = tar.extractfile(members["txt"])
                    caption = fh.read().decode("utf-8", "replace") if fh else ""
                yield Item(str(tar_path), member=image.name, offset=image.offset_data,
                           size=image.size, caption=caption)


def list_source(src: SourceConfig) -> Iterator[Item]:
    """The image references of one source, in a deterministic order."""
    kind = source_kind(src)
    if kind == "folder":
        return _folder_items(Path(src.path))
    if kind == "list":
        return _list_items(Path(src.path))
    return _shard_items(src.path)


def read_item_bytes(path: str, member: str, offset: int, size: int) -> bytes:
    """The encoded bytes of one image (a plain file, or a member of an uncompressed tar)."""
    if not member:
        with open(path, "rb") as fh:
            return fh.read()
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"tar member {member} truncated ({len(data)} of {size} bytes)")
    return data


def ingest(sources: list[tuple[str, SourceConfig]], progress: bool = True) -> dict[str, list]:
    """Hash every image of ``sources`` (pairs of role and source) into a table of columns.

    Exact duplicates (same sha256 within one role) keep the smallest id; the others get
    ``status="exact_duplicate"`` and ``dup_of``. Unreadable files get ``status="unreadable"``.
    """
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    first_by_hash: dict[tuple[str, str], int] = {}
    names = set()
    for role, src in sources:
        name = source_name(src)
        if (role, name) in names:
            raise UserError(f"two {role} sources are both named '{name}'; give them distinct names")
        names.add((role, name))
        for item in tqdm(list_source(src), desc=f"ingest {name}", disable=not progress,
                         unit="img", leave=False):
            idx = len(cols["id"])
            status, reason, sha, dup_of = "ok", item.error, "", -1
            size = item.size
            if not reason:
                try:
                    data = read_item_bytes(item.path, item.member, item.offset, item.size)
                    size = len(data)
                    if not data:
                        reason = "empty file"
                    sha = hashlib.sha256(data).hexdigest()
                except OSError as exc:
                    reason = f"cannot read: {exc.strerror or exc}"
            if reason:
                status = "unreadable"
            else:
                first = first_by_hash.setdefault((role, sha), idx)
                if first != idx:
                    status, reason, dup_of = "exact_duplicate", f"same sha256 as id {first}", first
            row = dict(id=idx, role=role, source=name, path=item.path, member=item.member,
                       offset=item.offset, size=size, sha256=sha, caption=item.caption,
                       status=status, reason=reason, dup_of=dup_of)
            for key, value in row.items():
                cols[key].append(value)
    n_bad = sum(s == "unreadable" for s in cols["status"])
    n_dup = sum(s == "exact_duplicate" for s in cols["status"])
    log.info("ingested %d images (%d exact duplicates, %d unreadable)",
             len(cols["id"]), n_dup, n_bad)
    return cols


def role_mask(table_cols: dict[str, np.ndarray], role: str) -> np.ndarray:
    """Boolean mask of rows with this role."""
    return np.asarray(table_cols["role"]) == role
