"""Helpers shared by the data tests: encoders, a PNG bomb, shard writing, a tiny config."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from dinosys.data.augment import CropConfig
from dinosys.data.masking import MaskConfig
from dinosys.data.sources import DataSourceConfig
from dinosys.train.tasks.ssl import SSLConfig


def jpeg_bytes(arr: np.ndarray, quality: int = 90, **save_kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, **save_kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def cmyk_jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    """A WebDataset tar with the given samples ({"__key__": ..., "jpg": bytes, ...})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def tiny_config(sources: list[tuple[str, float]], batch_size: int = 3, workers: int = 0,
                seed: int = 0, shuffle_buffer: int = 8) -> SSLConfig:
    """A SSLConfig with small crops (32/16 px, 2 locals) so tests run fast on 2 cores."""
    cfg = SSLConfig(seed=seed)
    cfg.crops = CropConfig(global_size=32, local_size=16, n_local=2)
    cfg.masking = MaskConfig()
    cfg.data.sources = [DataSourceConfig(path=str(p), weight=w) for p, w in sources]
    cfg.data.batch_size_per_gpu = batch_size
    cfg.data.num_workers = workers
    cfg.data.shuffle_buffer = shuffle_buffer
    return cfg
