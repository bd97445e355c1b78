"""Image folders, file lists, indexed WebDataset shards and the epoch order."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dinosys.data.decode import BadImageError
from dinosys.data.folder import ImageFolder, read_file_list
from dinosys.data.order import EpochOrder
from dinosys.data.sources import (
    DataSourceConfig,
    FileSource,
    ShardSource,
    build_source,
    expand_shards,
)
from dinosys.errors import UserError


def test_image_folder_sorted_classes(builtin_data: Path) -> None:
    root = builtin_data / "digits" / "val"
    ds = ImageFolder(root)
    assert ds.classes == sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(ds) == sum(1 for _ in root.rglob("*.png"))
    paths = [p for p, _ in ds.samples]
    assert paths == sorted(paths)  # class folders sorted, files sorted inside
    for path, label in ds.samples[:: max(1, len(ds) // 20)]:
        assert ds.classes[label] == path.parent.name
    with pytest.raises(UserError, match="not found"):
        ImageFolder(root / "missing")
    flat = ImageFolder(builtin_data / "photos", allow_flat=True)
    assert len(flat) >= 4 and set(flat.targets) == {-1}
    with pytest.raises(UserError, match="no images"):
        ImageFolder(builtin_data / "photos")  # evaluation folders need classes


def test_file_list(tmp_path: Path, builtin_data: Path) -> None:
    photos = sorted((builtin_data / "photos").iterdir())[:3]
    (tmp_path / "sub").mkdir()
    rel = tmp_path / "sub" / "a b.png"  # a path with a space
    rel.write_bytes(photos[0].read_bytes())
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n\nsub/a b.png 3\n{photos[1]}\n{photos[2]} 0\n")
    items = read_file_list(listing)
    assert items == [(rel, 3), (photos[1], -1), (photos[2], 0)]
    src = build_source(DataSourceConfig(path=str(listing)))
    assert isinstance(src, FileSource) and len(src) == 3
    assert src.read(0).image == rel.read_bytes() and src.read(0).label == 3
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="no image paths"):
        read_file_list(tmp_path / "empty.txt")
    missing = tmp_path / "missing.txt"
    missing.write_text("nope.png\n")
    with pytest.raises(BadImageError) as info:
        build_source(DataSourceConfig(path=str(missing))).read(0)
    assert info.value.reason == "read_error"


def test_shards_read_by_index_match_webdataset(builtin_data: Path) -> None:
    folder = builtin_data / "shards" / "mnist"
    shards = sorted(folder.glob("*.tar"))
    pattern = str(folder / f"{{000000..{len(shards) - 1:06d}}}.tar")
    src = build_source(DataSourceConfig(path=pattern))
    assert isinstance(src, ShardSource) and src.shards == [str(s) for s in shards]
    # webdataset's own sequential reader is the reference
    reference = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert len(src) == len(reference)
    for i in range(0, len(reference), 97):
        raw = src.read(i)
        assert raw.image == reference[i]["png"]
        assert raw.label == int(reference[i]["cls"])
        assert raw.where.endswith(reference[i]["__key__"])
    assert expand_shards(str(folder)) == [str(s) for s in shards]  # a folder of shards
    with pytest.raises(UserError, match="shard not found"):
        expand_shards(str(folder / "{000000..000099}.tar"))


def test_shards_without_sizes_json_are_indexed(id_shards: Path) -> None:
    src = ShardSource("ids", str(id_shards / "{000000..000002}.tar"))
    assert src.unit_sizes.tolist() == [7, 13, 5]
    labels = [src.read(i).label for i in range(len(src))]
    assert labels == list(range(25))
    img = Image.open(io.BytesIO(src.read(24).image))
    assert img.size == (48, 48)


def test_shard_index_skips_payloads(tmp_path: Path) -> None:
    """Indexing reads headers, not payloads: a 20 MB member costs nothing to index."""
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tf:
        for name, size in (("a.jpg", 20_000_000), ("a.cls", 1), ("b.json", 2)):
            info = tarfile.TarInfo(name)
            info.size = size
            tf.addfile(info, io.BytesIO(b"7" * size))
    src = ShardSource("big", str(path))
    assert len(src) == 2
    assert len(src.read(0).image) == 20_000_000 and src.read(0).label == 7
    with pytest.raises(BadImageError) as info:
        src.read(1)
    assert info.value.reason == "no_image_field"


class _Units:
    def __init__(self, sizes: list[int], shuffle_items: bool) -> None:
        self.unit_sizes = np.asarray(sizes)
        self.shuffle_items = shuffle_items


def _all_items(order: EpochOrder) -> list[tuple[int, int]]:
    return [order[p] for p in range(len(order))]


def test_epoch_order_is_a_deterministic_permutation() -> None:
    shards, files = _Units([7, 13, 5], False), _Units([256, 256, 30], True)
    order = EpochOrder([shards, files], [1.0, 1.0], seed=3, epoch=0, window_samples=20)
    items = _all_items(order)
    assert len(items) == 25 + 542
    assert sorted(items) == [(0, i) for i in range(25)] + [(1, i) for i in range(542)]
    again = EpochOrder([shards, files], [1.0, 1.0], seed=3, epoch=0, window_samples=20)
    assert _all_items(again) == items
    other = EpochOrder([shards, files], [1.0, 1.0], seed=3, epoch=1, window_samples=20)
    assert _all_items(other) != items and sorted(_all_items(other)) == sorted(items)
    assert items[:25] != sorted(items[:25])  # windows are shuffled


def test_epoch_order_weights() -> None:
    shards = _Units([10] * 8, False)
    twice = _all_items(EpochOrder([shards], [2.0], 0, 0, 16))
    assert sorted(twice) == sorted([(0, i) for i in range(80)] * 2)
    half = _all_items(EpochOrder([shards], [0.5], 0, 0, 16))
    assert len(half) == 40 and len(set(half)) == 40  # 4 of the 8 shards, each sample once
    mixed = EpochOrder([shards, _Units([5], True)], [1.0, 3.0], 0, 0, 16)
    assert len(mixed) == 80 + 15
    with pytest.raises(IndexError):
        mixed[len(mixed)]


def test_shard_index_is_cached(id_shards: Path, shard_index_cache: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    import dinosys.data.sources as sources

    pattern = str(id_shards / "{000000..000002}.tar")
    ShardSource("ids", pattern)
    cached = list((shard_index_cache / "shard_index").glob("*.json"))
    assert len(cached) >= 3

    def no_scan(path: str) -> None:
        raise AssertionError(f"{path} scanned again")

    monkeypatch.setattr(sources, "index_shard", no_scan)
    again = ShardSource("ids", pattern)  # every process after the first reads the cache
    assert [again.read(i).label for i in range(len(again))] == list(range(25))


def test_windows_mix_several_big_shards() -> None:
    """A window spans >= 8 units, so 1000-sample shards still mix with 7 others."""
    order = EpochOrder([_Units([1000] * 16, False)], [1.0], seed=0, epoch=0, window_samples=100)
    first = [order[p][1] // 1000 for p in range(200)]  # shard of each of the first samples
    assert len(set(first)) == 8


def test_samples_carry_every_member(tmp_path: Path, builtin_data: Path) -> None:
    """Image, caption (.txt), label (.cls) and metadata (.json): from shards and from files."""
    from data_helpers import write_shard

    png = (builtin_data / "mnist" / "train" / "3").glob("*.png").__next__().read_bytes()
    write_shard(tmp_path / "s" / "000000.tar", [
        {"__key__": "a", "png": png, "txt": "a red fox", "cls": "3", "json": '{"url": "x"}'},
        {"__key__": "b", "png": png},
        {"__key__": "c", "png": png, "json": "not json"}])
    src = build_source(DataSourceConfig(path=str(tmp_path / "s")))  # a folder of shards
    a, b, c = (src.read(i) for i in range(3))
    assert (a.image, a.text, a.label, a.meta) == (png, "a red fox", 3, {"url": "x"})
    assert (b.text, b.label, b.meta) == (None, -1, None)
    assert c.meta is None and c.image == png  # unreadable metadata does not cost the image
    folder = tmp_path / "f" / "cats"
    folder.mkdir(parents=True)
    (folder / "x.png").write_bytes(png)
    (folder / "x.txt").write_text("a cat\n")
    (folder / "x.json").write_text('{"id": 7}')
    sample = build_source(DataSourceConfig(path=str(tmp_path / "f"))).read(0)
    assert (sample.text, sample.meta, sample.label) == ("a cat", {"id": 7}, 0)


def test_source_kind_rules(tmp_path: Path, builtin_data: Path) -> None:
    from dinosys.data.sources import source_kind

    assert source_kind("d/{000000..000003}.tar") == "shards"
    assert source_kind("d/000000.tar") == "shards"
    assert source_kind(str(builtin_data / "shards" / "mnist")) == "shards"
    assert source_kind(str(builtin_data / "mnist" / "train")) == "folder"
    listing = tmp_path / "l.txt"
    listing.write_text("a.png\n")
    assert source_kind(str(listing)) == "list"
    assert source_kind(str(tmp_path), "shards") == "shards"  # an explicit kind wins
    with pytest.raises(UserError, match="not an image folder"):
        source_kind(str(tmp_path / "missing"))
