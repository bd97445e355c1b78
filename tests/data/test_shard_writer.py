"""ShardWriter: WebDataset-readable, rotating, atomic, reproducible shards + sizes.json."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dinosys.data.shard_writer import ShardWriter, encode_field


def _image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _samples(n: int) -> list[dict]:
    return [{"__key__": f"s_{i:04d}", "png": _image(i), "cls": i % 3,
             "json": {"index": i, "source": "test"}, "txt": f"caption {i}"} for i in range(n)]


def _write(out: Path, samples: list[dict], **kw) -> dict:
    with ShardWriter(out, **kw) as writer:
        for s in samples:
            writer.write(s)
    return writer.sizes


def _read(out: Path) -> list[dict]:
    urls = sorted(str(p) for p in out.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_roundtrip_with_webdataset(tmp_path: Path) -> None:
    samples = _samples(23)
    sizes = _write(tmp_path, samples, max_count=10)
    assert sizes == {"000000.tar": 10, "000001.tar": 10, "000002.tar": 3}
    assert json.loads((tmp_path / "sizes.json").read_text()) == sizes
    back = _read(tmp_path)
    assert [s["__key__"] for s in back] == [s["__key__"] for s in samples]
    for orig, got in zip(samples, back):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(got["png"]))), orig["png"])
        assert int(got["cls"]) == orig["cls"]
        assert json.loads(got["json"]) == orig["json"]
        assert got["txt"].decode() == orig["txt"]


def test_decoded_pipeline(tmp_path: Path) -> None:
    _write(tmp_path, _samples(5), max_count=2)
    ds = wds.WebDataset(sorted(str(p) for p in tmp_path.glob("*.tar")), shardshuffle=False)
    rows = list(ds.decode("rgb8").to_tuple("png", "cls", "json"))
    assert len(rows) == 5
    img, cls, meta = rows[4]
    np.testing.assert_array_equal(img, _image(4))
    assert cls == 4 % 3 and meta == {"index": 4, "source": "test"}


def test_deterministic_bytes_and_headers(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, _samples(7), max_count=4)
    _write(b, _samples(7), max_count=4)
    for name in ("000000.tar", "000001.tar", "sizes.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    with tarfile.open(a / "000000.tar") as tf:
        members = tf.getmembers()
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert all(not m.pax_headers for m in members)
    # fields of one sample are stored in sorted order, samples in write order
    names = [m.name for m in members[:4]]
    assert names == ["s_0000.cls", "s_0000.json", "s_0000.png", "s_0000.txt"]


def test_rotation_by_size(tmp_path: Path) -> None:
    blob = bytes(3000)  # 512 header + 3072 data per sample
    samples = [{"__key__": f"k{i}", "bin": blob} for i in range(5)]
    sizes = _write(tmp_path, samples, max_size=8000)
    assert sizes == {"000000.tar": 2, "000001.tar": 2, "000002.tar": 1}
    assert len(_read(tmp_path)) == 5


@pytest.mark.parametrize("key", ["a.b", "", "dir/name", "_meta", " pad", None, 3])
def test_rejects_bad_keys(tmp_path: Path, key: object) -> None:
    with ShardWriter(tmp_path) as writer, pytest.raises(ValueError):
        writer.write({"__key__": key, "txt": "x"})


def test_rejects_bad_fields_and_repeats(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="no fields"):
            writer.write({"__key__": "a"})
        with pytest.raises(ValueError, match="bad field"):
            writer.write({"__key__": "a", ".png": b"x"})
        with pytest.raises(ValueError, match="cannot encode"):
            writer.write({"__key__": "a", "png": 1.5})
        with pytest.raises(ValueError, match="uint8"):
            writer.write({"__key__": "a", "png": np.zeros((4, 4), np.float32)})
        writer.write({"__key__": "a", "txt": "x"})
        with pytest.raises(ValueError, match="repeats"):
            writer.write({"__key__": "a", "txt": "y"})
    assert writer.sizes == {"000000.tar": 1}


def test_failure_leaves_no_partial_shard_and_no_sizes(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path, max_count=3) as writer:
        for s in _samples(5):
            writer.write(s)
        raise RuntimeError("boom")
    # the finished first shard stays, the one in progress is gone, nothing says "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.tar"]
    assert len(_read(tmp_path)) == 3


def test_existing_shards_need_overwrite_and_prefixes_merge(tmp_path: Path) -> None:
    _write(tmp_path, _samples(3), prefix="rank0_")
    _write(tmp_path, _samples(2), prefix="rank1_")
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "rank0_000000.tar": 3, "rank1_000000.tar": 2}
    with pytest.raises(FileExistsError, match="overwrite"):
        ShardWriter(tmp_path, prefix="rank0_")
    _write(tmp_path, _samples(1), prefix="rank0_", overwrite=True)
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "rank0_000000.tar": 1, "rank1_000000.tar": 2}
    # no temp file left behind; only the (empty) lock file that guards sizes.json
    assert [p.name for p in tmp_path.glob(".*")] == [".sizes.json.lock"]


def test_resume_after_existing_shards(tmp_path: Path) -> None:
    samples = _samples(7)
    _write(tmp_path, samples[:4], max_count=2)  # 000000, 000001
    (tmp_path / "000002.tar").write_bytes(b"left by a crashed run")
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path, start_index=2)
    sizes = _write(tmp_path, samples[4:], max_count=2, start_index=2, overwrite=True)
    assert sizes == {"000002.tar": 2, "000003.tar": 1}
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "000000.tar": 2, "000001.tar": 2, "000002.tar": 2, "000003.tar": 1}
    assert [s["__key__"] for s in _read(tmp_path)] == [s["__key__"] for s in samples]


def test_reshard_samples_read_back(tmp_path: Path) -> None:
    _write(tmp_path / "a", _samples(3))
    back = _read(tmp_path / "a")  # carry __url__, __local_path__: not stored again
    _write(tmp_path / "b", back)
    shard = "000000.tar"
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_encode_field_types() -> None:
    assert encode_field("cls", 7) == b"7"
    assert encode_field("txt", "héllo") == "héllo".encode()
    assert encode_field("json", {"b": 1, "a": [1, 2]}) == b'{"a": [1, 2], "b": 1}'
    jpg = encode_field("jpg", Image.fromarray(_image(0, 32)))
    assert Image.open(io.BytesIO(jpg)).format == "JPEG"
    webp = encode_field("webp", _image(1))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(webp))), _image(1))
    with pytest.raises(ValueError, match="bool"):
        encode_field("cls", True)
