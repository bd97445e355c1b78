"""Curation ingest: damaged shards are counted sample by sample with shard and offset, too much
unreadable input stops with one line, and an image replaced in place is hashed again
(issue 18, items 6 and 8)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.config import CurationConfig, SourceConfig
from curation.ingest import check_unreadable_fraction, finish_ingest, hash_units, list_units
from curation.pipeline import stage_ingest
from dinosys.data.shard_writer import ShardWriter
from dinosys.data.sources import index_shard
from dinosys.errors import UserError

PER_SHARD = 20


def _png(seed: int) -> bytes:
    import io

    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def damaged_shards(tmp_path: Path) -> Path:
    """Three shards of 20 PNGs (+ sizes.json): garbage in 000000, 000001 cut short, 000002
    empty, 000003 sound."""
    root = tmp_path / "shards"
    with ShardWriter(root, max_count=PER_SHARD) as writer:
        for i in range(4 * PER_SHARD):
            writer.write({"__key__": f"s{i:04d}", "png": _png(i), "txt": f"image {i}"})
    first = root / "000000.tar"
    data = bytearray(first.read_bytes())
    middle = len(data) // 2 // 512 * 512
    data[middle:middle + 4096] = np.random.default_rng(1).integers(1, 256, 4096, np.uint8).tobytes()
    first.write_bytes(bytes(data))
    second = root / "000001.tar"
    second.write_bytes(second.read_bytes()[: int(second.stat().st_size * 0.6)])
    (root / "000002.tar").write_bytes(b"")
    return root


def _ingest(root: Path) -> dict[str, np.ndarray]:
    units = list_units([("pool", SourceConfig(path=str(root)))])
    return finish_ingest([hash_units(units, list(range(len(units))), progress=False)])


def test_every_lost_sample_is_a_row_with_shard_and_offset(damaged_shards: Path) -> None:
    cols = _ingest(damaged_shards)
    readable = {s: sum(m is not None for m in index_shard(str(damaged_shards / f"{s:06d}.tar"))
                       .image) for s in range(4)}  # samples whose image survived
    lost = sum(PER_SHARD - n for n in readable.values())
    assert readable[3] == PER_SHARD and readable[2] == 0 and lost > PER_SHARD
    assert len(cols["id"]) == 4 * PER_SHARD  # read or counted: nothing disappears
    bad = cols["status"] == "unreadable"
    assert int(bad.sum()) == lost
    reasons = [str(r) for r in cols["reason"][bad]]
    assert all(r.startswith("damaged shard: ") for r in reasons)
    assert any("garbage at offset" in r for r in reasons)
    assert any("truncated at offset" in r for r in reasons)
    assert sum("empty_shard at offset 0" in r for r in reasons) == PER_SHARD
    paths = set(cols["path"][bad])
    assert paths == {str(damaged_shards / f"{s:06d}.tar") for s in range(3)}

    with pytest.raises(UserError, match=r"of 80 input images are unreadable \(damaged shard: "
                                         r"\d+.*max_unreadable_fraction=0.1") as info:
        check_unreadable_fraction(cols, 0.1)
    assert "\n" not in str(info.value)
    check_unreadable_fraction(cols, 0.9)


def test_stage_stops_above_the_unreadable_limit(damaged_shards: Path, tmp_path: Path) -> None:
    cfg = CurationConfig(out=str(tmp_path / "work"), progress=False,
                         sources=[SourceConfig(path=str(damaged_shards))])
    with pytest.raises(UserError, match="max_unreadable_fraction"):
        stage_ingest(cfg)
    cfg.max_unreadable_fraction = 0.9
    assert stage_ingest(cfg)["unreadable"] > PER_SHARD


def test_an_image_replaced_in_place_is_hashed_again(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(_png(i))
    cfg = CurationConfig(out=str(tmp_path / "work"), progress=False,
                         sources=[SourceConfig(path=str(folder))])
    stage_ingest(cfg)
    target = folder / "img1.png"
    folder_stat, file_stat = folder.stat(), target.stat()
    new = _png(99)
    with open(target, "r+b") as fh:  # in place: same inode, the folder entry is untouched
        fh.write(new)
        fh.truncate()
    os.utime(target, ns=(file_stat.st_atime_ns, file_stat.st_mtime_ns))
    os.utime(folder, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    stage_ingest(cfg)
    items = pq.read_table(tmp_path / "work" / "ingest" / "items.parquet").to_pydict()
    sha = dict(zip(items["path"], items["sha256"]))
    assert sha[str(target)] == hashlib.sha256(new).hexdigest()
