"""Fixtures for the data pipeline tests: real photos, every kind of bad sample, small shards."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from data_helpers import bomb_png, cmyk_jpeg_bytes, jpeg_bytes, png_bytes, write_shard
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def shard_index_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the tests' shard index cache out of the home directory."""
    root = tmp_path_factory.mktemp("dinosys_cache")
    os.environ["DINOSYS_CACHE"] = str(root)
    return root


def _photo_paths(builtin_data: Path) -> list[Path]:
    paths = sorted(p for p in (builtin_data / "photos").iterdir()
                   if p.suffix.lower() in (".png", ".jpg"))
    assert len(paths) >= 4, "builtin photos missing"
    return paths


@pytest.fixture(scope="session")


def photos(builtin_data: Path) -> list[np.ndarray]:
    """Real colour photos (uint8 HxWx3) shipped in scikit-learn / scikit-image wheels."""
    return [np.asarray(Image.open(p).convert("RGB")) for p in _photo_paths(builtin_data)]


@pytest.fixture(scope="session")


def sample_kinds(photos: list[np.ndarray]) -> dict[str, dict]:
    """Every good-but-awkward and bad sample kind, as encoded bytes plus the expected outcome."""
    src = photos[0][:240, :320]
    small = np.asarray(Image.fromarray(src).resize((96, 72), Image.Resampling.BICUBIC))
    good_jpeg = jpeg_bytes(small)
    rgba = Image.fromarray(small).convert("RGBA")
    alpha = np.full(small.shape[:2], 255, dtype=np.uint8)
    alpha[:, :20] = 0  # a fully transparent band: must come out white
    rgba.putalpha(Image.fromarray(alpha))
    palette = Image.fromarray(small).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    gray16 = (np.asarray(Image.fromarray(small).convert("L")).astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": store the pixels rotated 90 CCW
    rotated = jpeg_bytes(np.ascontiguousarray(np.rot90(small, k=1)), exif=exif.tobytes())
    return {
        "good_jpeg": {"data": good_jpeg, "reason": None, "ref": small},
        "empty": {"data": b"", "reason": "empty"},
        "truncated_jpeg": {"data": jpeg_bytes(src)[: len(jpeg_bytes(src)) // 2],
                           "reason": "truncated"},
        "text_as_jpg": {"data": b"this is not an image, just text\n" * 8, "reason": "not_image"},
        "png_rgba": {"data": png_bytes(rgba), "reason": None, "ref": small, "white_cols": 20},
        "png_palette": {"data": png_bytes(palette), "reason": None, "ref": small},
        "png_16bit": {"data": png_bytes(Image.fromarray(gray16)), "reason": None,
                      "ref_gray": gray16 >> 8},
        "cmyk_jpeg": {"data": cmyk_jpeg_bytes(small), "reason": None, "ref": small},
        "exif_rotated": {"data": rotated, "reason": None, "ref": small},
        "bomb_png": {"data": bomb_png(), "reason": "too_large"},
    }


@pytest.fixture(scope="session")


def id_shards(tmp_path_factory: pytest.TempPathFactory, photos: list[np.ndarray]) -> Path:
    """Three shards of 7, 13 and 5 small JPEGs whose .cls label is a unique sample id."""
    root = tmp_path_factory.mktemp("id_shards")
    rng = np.random.default_rng(0)
    sid = 0
    for shard, count in enumerate((7, 13, 5)):
        samples = []
        for _ in range(count):
            photo = photos[sid % len(photos)]
            y, x = rng.integers(0, photo.shape[0] - 48), rng.integers(0, photo.shape[1] - 48)
            samples.append({"__key__": f"s{sid:05d}", "jpg": jpeg_bytes(photo[y:y + 48, x:x + 48]),
                            "cls": str(sid).encode()})
            sid += 1
        write_shard(root / f"{shard:06d}.tar", samples)
    return root


@pytest.fixture(scope="session")


def bad_shard(tmp_path_factory: pytest.TempPathFactory, sample_kinds: dict) -> Path:
    """One shard holding every sample kind (good, awkward and bad) plus a sample without image."""
    root = tmp_path_factory.mktemp("bad_shard")
    samples = []
    for i, (name, kind) in enumerate(sample_kinds.items()):
        ext = "png" if name.startswith("png") or name == "bomb_png" else "jpg"
        samples.append({"__key__": f"k{i:03d}_{name}", ext: kind["data"], "cls": b"1"})
    samples.append({"__key__": "k900_no_image", "json": b'{"caption": "no image here"}',
                    "cls": b"2"})
    write_shard(root / "000000.tar", samples)
    return root
