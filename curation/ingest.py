"""Ingest: list the images of folders, file lists and WebDataset shards, hash their bytes
(sha256) and mark exact duplicates. Unreadable inputs are recorded with a reason, never fatal.

Shard members are located by byte offset, so later stages read one image without scanning tars.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from curation.config import SourceConfig
from dinosys.data.sources import expand_shards, source_kind
from dinosys.data.tar_scan import Damage, scan_tar
from dinosys.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
COLUMNS = ("id", "role", "source", "path", "member", "offset", "size", "sha256", "caption",
           "status", "reason", "dup_of")
PART_COLUMNS = ("unit", "pos", "role", "source", "path", "member", "offset", "size", "sha256",
                "caption", "reason")


@dataclass
class Item:
    """One image reference before hashing."""

    path: str
    member: str = ""  # tar member name ("" for a plain file)
    offset: int = -1  # byte offset of the member's data inside the tar
    size: int = -1
    caption: str = ""
    error: str = ""  # set when the input is already known to be unreadable


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


def _expected_count(tar_path: Path) -> int | None:
    """The shard's sample count in the ``sizes.json`` beside it (ShardWriter's), if any."""
    try:
        value = json.loads((tar_path.parent / "sizes.json").read_text()).get(tar_path.name)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _damage_items(tar_path: Path, damage: list[Damage], found: int) -> Iterator[Item]:
    """Rows for what a damaged shard lost: one per lost sample when ``sizes.json`` says how
    many the shard held, else one per damaged byte range."""
    where = "; ".join(d.describe() for d in damage)
    expected = _expected_count(tar_path)
    first = damage[0]
    if expected is not None and expected > found:
        for k in range(expected - found):
            yield Item(str(tar_path), offset=first.offset, size=first.length,
                       error=f"damaged shard: {where} (lost sample {k + 1} of {expected - found})")
        return
    for d in damage:
        yield Item(str(tar_path), offset=d.offset, size=d.length,
                   error=f"damaged shard: {d.describe()} (samples stored there are lost)")


def _shard_items(tar: str) -> Iterator[Item]:
    """The images of one shard (a unit): members located by offset, damage as rows."""
    for tar_path in [Path(tar)]:
        try:
            scan = scan_tar(tar_path)
        except OSError as exc:
            yield Item(str(tar_path), error=f"unreadable shard: {exc.strerror or exc}")
            continue
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for info in scan.members:
            base = info.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            prefix = info.name[: len(info.name) - len(base)]
            groups.setdefault(prefix + key, {})[ext.lower()] = info
        found = 0
        with open(tar_path, "rb") as fh:
            for members in groups.values():
                image = next((members[e] for e in ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
                              if e in members), None)
                if image is None:
                    continue
                found += 1
                caption = ""
                if "txt" in members:
                    fh.seek(members["txt"].offset_data)
                    caption = fh.read(members["txt"].size).decode("utf-8", "replace")
                yield Item(str(tar_path), member=image.name, offset=image.offset_data,
                           size=image.size, caption=caption)
        if scan.damage:
            log.warning("shard %s is damaged: %s", tar_path,
                        "; ".join(d.describe() for d in scan.damage))
            yield from _damage_items(tar_path, scan.damage, found)


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


UNIT_FILES = 1024  # files of a folder or list per ingest unit (a shard is one unit)


@dataclass
class Unit:
    """A slice of one source that one ingest part hashes: a block of files, or one shard."""

    role: str
    source: str  # the source's name
    items: list[Item] | None = None  # files (folder / list sources)
    shard: str = ""  # a tar (shard sources): its members are listed by the part


def list_units(sources: list[tuple[str, SourceConfig]]) -> list[Unit]:
    """The ingest units of ``sources`` (pairs of role and source), in a deterministic order;
    part ``i`` of ``n`` hashes the units ``u % n == i``."""
    units: list[Unit] = []
    names = set()
    for role, src in sources:
        name = source_name(src)
        if (role, name) in names:
            raise UserError(f"two {role} sources are both named '{name}'; give them distinct names")
        names.add((role, name))
        kind = source_kind(src.path, src.kind)  # the rules training's data sources follow
        if kind == "shards":
            tars = expand_shards(src.path)
            units.extend(Unit(role, name, shard=str(t)) for t in tars)
            continue
        files = list(_folder_items(Path(src.path)) if kind == "folder"
                     else _list_items(Path(src.path)))
        units.extend(Unit(role, name, items=files[lo: lo + UNIT_FILES])
                     for lo in range(0, len(files), UNIT_FILES))
    return units


def units_fingerprint(units: list[Unit]) -> list:
    """What ingest reads, file by file: (path, size, mtime_ns, ctime_ns) of every listed image
    and shard. An image replaced in place changes it even when its folder's stat does not (and
    ctime changes even when a copy keeps the old mtime)."""
    out: list = []
    for unit in units:
        paths = [item.path for item in unit.items] if unit.items is not None else [unit.shard]
        for path in paths:
            try:
                st = os.stat(path)
                out.append((path, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            except OSError:
                out.append((path, None, None, None))
    return out


def hash_units(units: list[Unit], selected: list[int], progress: bool = True) -> dict[str, list]:
    """Read and hash the items of the ``selected`` units: one row per item with its unit index
    and position (ids and exact duplicates are decided by :func:`finish_ingest`)."""
    cols: dict[str, list] = {c: [] for c in (*PART_COLUMNS,)}
    bar = tqdm(total=len(selected), desc="ingest", unit="unit", disable=not progress,
               leave=False)
    for u in selected:
        unit = units[u]
        listed = unit.items if unit.items is not None else _shard_items(unit.shard)
        for pos, item in enumerate(listed):
            sha, size, reason = "", item.size, item.error
            if not reason:
                try:
                    data = read_item_bytes(item.path, item.member, item.offset, item.size)
                    size = len(data)
                    if not data:
                        reason = "empty file"
                    sha = hashlib.sha256(data).hexdigest()
                except OSError as exc:
                    reason = f"cannot read: {exc.strerror or exc}"
            row = dict(unit=u, pos=pos, role=unit.role, source=unit.source, path=item.path,
                       member=item.member, offset=item.offset, size=size, sha256=sha,
                       caption=item.caption, reason=reason)
            for key, value in row.items():
                cols[key].append(value)
        bar.update()
    bar.close()
    return cols


def finish_ingest(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The item table from the parts' rows: ordered by (unit, position), ids 0..N-1, exact
    duplicates (same sha256 within one role) pointing at the smallest id, unreadable items."""
    cols = {c: np.concatenate([np.asarray(p[c]) for p in parts]) if parts else np.zeros(0)
            for c in PART_COLUMNS}
    order = np.lexsort((cols["pos"], cols["unit"]))
    cols = {c: v[order] for c, v in cols.items()}
    n = len(order)
    ids = np.arange(n, dtype=np.int64)
    reason = cols["reason"].astype(object)
    bad = np.array([bool(r) for r in reason], dtype=bool)
    status = np.where(bad, "unreadable", "ok").astype(object)
    dup_of = np.full(n, -1, dtype=np.int64)
    ok = np.flatnonzero(~bad)
    if len(ok):
        key = np.char.add(np.char.add(cols["role"][ok].astype(str), "/"),
                          cols["sha256"][ok].astype(str))
        _, first_idx, inverse = np.unique(key, return_index=True, return_inverse=True)
        first = ok[first_idx][inverse.reshape(-1)]
        dup = first != ok
        dup_of[ok[dup]] = first[dup]
        status[ok[dup]] = "exact_duplicate"
        reason[ok[dup]] = [f"same sha256 as id {f}" for f in first[dup]]
    out = {"id": ids, "role": cols["role"], "source": cols["source"], "path": cols["path"],
           "member": cols["member"], "offset": cols["offset"].astype(np.int64),
           "size": cols["size"].astype(np.int64), "sha256": cols["sha256"],
           "caption": cols["caption"], "status": status, "reason": reason, "dup_of": dup_of}
    log.info("ingested %d images (%d exact duplicates, %d unreadable)", n,
             int((status == "exact_duplicate").sum()), int(bad.sum()))
    return {c: out[c] for c in COLUMNS}


def check_unreadable_fraction(cols: dict[str, np.ndarray], limit: float) -> None:
    """UserError when more than ``limit`` of the ingested rows are unreadable, naming the most
    frequent reasons (a shard that lost samples counts each of them)."""
    status = np.asarray(cols["status"])
    bad = np.flatnonzero(status == "unreadable")
    if not len(status) or len(bad) <= limit * len(status):
        return
    kinds: dict[str, int] = {}
    for reason in np.asarray(cols["reason"])[bad]:
        kind = str(reason).split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    top = ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:3])
    first = np.asarray(cols["path"])[bad[0]]
    raise UserError(f"{len(bad)} of {len(status)} input images are unreadable ({top}; first: "
                    f"{first}), more than max_unreadable_fraction={limit:g}: repair or remove "
                    "the damaged inputs, or raise the limit")


def ingest(sources: list[tuple[str, SourceConfig]], progress: bool = True) -> dict[str, list]:
    """Hash every image of ``sources`` (pairs of role and source) into a table of columns, in
    one process (:func:`list_units`, :func:`hash_units`, :func:`finish_ingest`).

    Exact duplicates (same sha256 within one role) keep the smallest id; the others get
    ``status="exact_duplicate"`` and ``dup_of``. Unreadable files get ``status="unreadable"``.
    """
    units = list_units(sources)
    cols = finish_ingest([hash_units(units, list(range(len(units))), progress)])
    return {k: v.tolist() for k, v in cols.items()}
