"""A strict scan of an uncompressed tar: every member, and every byte range that is not one.

Python's ``tarfile`` stops at the first bad header and reports nothing, so a shard with garbage
in the middle, or cut short, silently loses the rest of its samples. :func:`scan_tar` reads
headers with resynchronisation (``ignore_zeros``: a bad 512-byte block is skipped, so members
after a damaged region are still found) and accounts for every byte: a gap between members that
is not zero padding, a member whose data runs past the end of the file, an empty or non-tar
file, a tar without its end-of-archive blocks, are returned as :class:`Damage` ranges (offset,
length, reason) instead of disappearing.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

BLOCK = tarfile.BLOCKSIZE
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Damage:
    """A byte range of a tar that holds no readable member."""

    offset: int
    length: int
    reason: str  # "empty_shard", "garbage" (not a tar header), "truncated" (cut short)

    def describe(self) -> str:
        """``garbage at offset 10240 (5120 bytes)``."""
        return f"{self.reason} at offset {self.offset} ({self.length} bytes)"


@dataclass
class TarScan:
    """Regular-file members in tar order (complete ones only) and the damaged ranges."""

    members: list[tarfile.TarInfo] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    size: int = 0


def _all_zero(fh, start: int, end: int) -> bool:  # noqa: ANN001 - a binary file object
    fh.seek(start)
    left = end - start
    while left > 0:
        chunk = fh.read(min(left, _CHUNK))
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        left -= len(chunk)
    return True


def _gap(fh, start: int, end: int, size: int) -> Damage | None:  # noqa: ANN001
    """The damage in ``[start, end)`` (bytes between members), or None for zero padding."""
    if end <= start or _all_zero(fh, start, end):
        return None
    reason = "truncated" if end == size and end - start < BLOCK else "garbage"
    return Damage(start, end - start, reason)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Every header tarfile can parse, resynchronising after one it cannot (a random block can
    look like the start of a long-name header whose continuation is invalid)."""
    while True:
        try:
            member = tar.next()
        except tarfile.TarError:
            tar.offset += BLOCK  # next() stopped at the bad header: try the following block
            continue
        if member is None:
            return
        yield member


def scan_tar(path: str | os.PathLike) -> TarScan:
    """Scan ``path``'s headers strictly (see the module docstring). OSError if it cannot be
    opened or read; a file that is not a tar at all is one ``garbage`` range, not an error."""
    size = os.stat(path).st_size
    scan = TarScan(size=size)
    if size == 0:
        scan.damage.append(Damage(0, 0, "empty_shard"))
        return scan
    expected = 0  # where the next header should start
    with open(path, "rb") as fh:
        try:
            tar = tarfile.open(fileobj=fh, mode="r:", ignore_zeros=True)
        except tarfile.ReadError:
            scan.damage.append(Damage(0, size, "garbage" if size >= BLOCK else "truncated"))
            return scan
        for member in _members(tar):
            damage = _gap(fh, expected, member.offset, size)
            if damage is not None:
                scan.damage.append(damage)
            end = member.offset_data + member.size
            if end > size:
                scan.damage.append(Damage(member.offset, size - member.offset, "truncated"))
                expected = size
                break
            expected = member.offset_data + -(-member.size // BLOCK) * BLOCK
            if member.isfile():
                scan.members.append(member)
        damage = _gap(fh, min(expected, size), size, size)
        if damage is not None:
            scan.damage.append(damage)
        elif expected >= size and not any(d.reason == "truncated" for d in scan.damage):
            # no end-of-archive blocks after the last member: cut short at a member boundary
            scan.damage.append(Damage(size, 0, "truncated"))
    return scan
