"""Damaged shards: every lost sample is counted by reason with shard and offset, an empty shard
is a counted skip, and too much unreadable data stops the run with one line (issue 18, item 6).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from data_helpers import jpeg_bytes, tiny_config, write_shard

from dinosys.data.decode import BadImageError
from dinosys.data.multicrop import build_ssl_loader
from dinosys.data.sources import ShardSource, index_shard
from dinosys.data.tar_scan import scan_tar
from dinosys.errors import UserError

PER_SHARD = 40


@pytest.fixture()
def damaged(tmp_path: Path, photos: list[np.ndarray]) -> Path:
    """Four shards of 40 JPEGs (label = sample id) with sizes.json: 000000 sound, 000001 with
    8 KiB of garbage in the middle, 000002 cut at 55 %, 000003 zero bytes."""
    rng = np.random.default_rng(0)
    for shard in range(4):
        samples = []
        for i in range(PER_SHARD):
            sid = shard * PER_SHARD + i
            photo = photos[sid % len(photos)]
            y, x = rng.integers(0, photo.shape[0] - 48), rng.integers(0, photo.shape[1] - 48)
            samples.append({"__key__": f"s{sid:05d}", "jpg": jpeg_bytes(photo[y:y + 48, x:x + 48]),
                            "cls": str(sid).encode()})
        write_shard(tmp_path / f"{shard:06d}.tar", samples)
    (tmp_path / "sizes.json").write_text(json.dumps({f"{s:06d}.tar": PER_SHARD for s in range(4)}))
    one = tmp_path / "000001.tar"
    data = bytearray(one.read_bytes())
    middle = len(data) // 2 // 512 * 512
    data[middle:middle + 8192] = np.random.default_rng(1).integers(1, 256, 8192, np.uint8).tobytes()
    one.write_bytes(bytes(data))
    two = tmp_path / "000002.tar"
    two.write_bytes(two.read_bytes()[: int(two.stat().st_size * 0.55)])
    (tmp_path / "000003.tar").write_bytes(b"")
    return tmp_path


def test_scan_finds_every_damaged_range(damaged: Path) -> None:
    assert scan_tar(damaged / "000000.tar").damage == []
    [garbage] = scan_tar(damaged / "000001.tar").damage
    size = (damaged / "000001.tar").stat().st_size
    assert garbage.reason == "garbage" and size // 2 - 1024 <= garbage.offset <= size // 2 + 1024
    [cut] = scan_tar(damaged / "000002.tar").damage
    assert cut.reason == "truncated"
    assert cut.offset + cut.length == (damaged / "000002.tar").stat().st_size
    assert [d.reason for d in scan_tar(damaged / "000003.tar").damage] == ["empty_shard"]
    # members after the garbage are still found (tarfile alone stops at the bad header)
    keys = index_shard(str(damaged / "000001.tar")).keys
    assert keys[-1] == f"s{2 * PER_SHARD - 1:05d}" and len(keys) < PER_SHARD


def test_every_sample_is_read_or_counted(damaged: Path, caplog) -> None:
    with caplog.at_level("WARNING"):
        source = ShardSource("damaged", str(damaged))
        assert len(source) == 4 * PER_SHARD  # sizes.json: what the shards should hold
        read, reasons, details = 0, {}, []
        for i in range(len(source)):
            try:
                source.read(i)
                read += 1
            except BadImageError as exc:
                reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
                details.append(exc.detail)
    assert read + sum(reasons.values()) == 4 * PER_SHARD
    lost = sum(PER_SHARD - len(index_shard(str(damaged / f"{s:06d}.tar")).keys) for s in range(4))
    assert reasons["damaged_shard"] == lost >= PER_SHARD + 2  # the empty shard, and more
    assert set(reasons) <= {"damaged_shard", "no_image_field"}
    assert any("000001.tar: garbage at offset" in d for d in details)
    assert any("000002.tar: truncated at offset" in d for d in details)
    assert any("000003.tar: empty_shard at offset 0" in d for d in details)
    assert "000001.tar is damaged: garbage at offset" in caplog.text


def test_without_sizes_json_the_damage_is_logged_with_its_offset(damaged: Path, caplog) -> None:
    os.remove(damaged / "sizes.json")
    with caplog.at_level("WARNING"):
        source = ShardSource("damaged", str(damaged))  # an empty shard no longer aborts
    assert PER_SHARD < len(source) < 3 * PER_SHARD
    for shard in ("000001.tar is damaged: garbage at offset", "000002.tar is damaged: truncated",
                  "000003.tar is damaged: empty_shard at offset 0"):
        assert shard in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_counts_lost_samples_and_stops_above_the_limit(damaged: Path, workers) -> None:
    cfg = tiny_config([(str(damaged), 1.0)], batch_size=8, workers=workers)
    cfg.data.max_bad_fraction = 0.6
    loader = build_ssl_loader(cfg, 0, 1, 8)
    batches = list(itertools.islice(iter(loader), loader.batches_per_epoch))
    assert len(batches) == 20
    stats = loader.stats()
    assert stats["bad"]["damaged_shard"] >= PER_SHARD + 2, stats
    assert any(line.endswith(": damaged_shard") for line in stats["recent_bad"])

    cfg.data.max_bad_fraction = 0.1  # the default: about a third of this data is lost
    loader = build_ssl_loader(cfg, 0, 1, 8)
    with pytest.raises(UserError, match=r"samples read so far were unreadable \(damaged_shard: "
                                         r"\d+.*more than data.max_bad_fraction=0.1") as info:
        list(itertools.islice(iter(loader), loader.batches_per_epoch))
    assert "\n" not in str(info.value)


def test_an_empty_shard_is_a_counted_skip(tmp_path: Path, photos) -> None:
    write_shard(tmp_path / "000000.tar", [{"__key__": f"k{i:03d}", "jpg": jpeg_bytes(
        photos[i % len(photos)][:48, :48])} for i in range(30)])
    (tmp_path / "000001.tar").write_bytes(b"")
    loader = build_ssl_loader(tiny_config([(str(tmp_path), 1.0)], batch_size=5), 0, 1, 8)
    assert len(list(itertools.islice(iter(loader), 6))) == 6
    assert loader.stats()["bad"] == {}  # no sizes.json: the empty shard simply holds nothing
