"""Image + caption batches through the generic stream: captions tokenised, samples without a
usable caption skipped and counted, long captions cut with end-of-text kept, folders with .txt
sidecars as well as shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinosys.config import ConfigError
from dinosys.data.image_text import ImageTextBatches, ImageTextConfig
from dinosys.data.shard_writer import ShardWriter
from dinosys.data.sources import DataSourceConfig
from dinosys.data.stream import DataConfig, SampleLoader
from dinosys.data.tokenizer import EOT_ID, SOT_ID, ClipTokenizer


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _shard(root: Path) -> tuple[Path, dict[str, int]]:
    """24 samples: 4 without .txt, 2 with an empty one, 3 not UTF-8, 1 very long, 14 good."""
    kinds = {"none": 0, "empty": 0, "latin1": 0, "long": 0, "good": 0}
    with ShardWriter(root, max_count=10) as writer:
        for i in range(24):
            sample = {"__key__": f"s{i:03d}", "png": _png(10 * i)}
            kind = ("none" if i < 4 else "empty" if i < 6 else "latin1" if i < 9
                    else "long" if i == 9 else "good")
            kinds[kind] += 1
            if kind == "empty":
                sample["txt"] = "   "
            elif kind == "latin1":
                sample["txt"] = "une photo élégante".encode("latin-1")
            elif kind == "long":
                sample["txt"] = "word " * 100
            elif kind == "good":
                sample["txt"] = f"a grey square number {i}"
            writer.write(sample)
    return root, kinds


def _loader(path: Path, batch: int, context: int = 16) -> SampleLoader:
    data = DataConfig(sources=[DataSourceConfig(path=str(path))], batch_size_per_gpu=batch,
                      num_workers=0)
    cfg = ImageTextConfig(size=16, scale=[0.5, 1.0])
    return SampleLoader(data, 0, 0, 1, ImageTextBatches(cfg, context))


def test_captionless_and_undecodable_captions_are_skipped_and_counted(tmp_path):
    shards, kinds = _shard(tmp_path / "shards")
    loader = _loader(shards, batch=24)
    batch = next(iter(loader))
    assert batch["images"].shape == (24, 3, 16, 16) and batch["tokens"].shape == (24, 16)
    stats = loader.stats()
    # every bad sample of the epoch was counted by reason (a replacement drawn from the same
    # epoch may be bad again and is counted too) and none reached the batch
    assert set(stats["bad"]) == {"no_text", "bad_text"}, stats
    assert stats["bad"]["no_text"] >= kinds["none"] + kinds["empty"], stats
    assert stats["bad"]["bad_text"] >= kinds["latin1"], stats
    recent = " ".join(stats["recent_bad"])
    assert "no_text" in recent or "bad_text" in recent
    tokens = batch["tokens"]
    assert (tokens[:, 0] == SOT_ID).all()
    assert ((tokens == EOT_ID).sum(1) == 1).all()  # every row ends once, long ones too
    assert batch["text_truncated"] >= 1
    tok = ClipTokenizer(16)
    texts = {tok.decode(row) for row in tokens}
    assert all(t.startswith("a grey square number") or t.startswith("word") for t in texts)


def test_folders_with_caption_sidecars(tmp_path):
    root = tmp_path / "folder" / "cls"
    root.mkdir(parents=True)
    for i in range(6):
        (root / f"{i}.png").write_bytes(_png(40 * i))
        if i != 5:
            (root / f"{i}.txt").write_text(f"picture {i}")
    loader = _loader(tmp_path / "folder", batch=6)
    batch = next(iter(loader))
    assert loader.stats()["bad"] == {"no_text": 1}
    assert batch["tokens"][:, 0].eq(SOT_ID).all()


def test_same_batches_whatever_the_worker_count(tmp_path):
    shards, _ = _shard(tmp_path / "shards")
    a = next(iter(_loader(shards, batch=8)))
    data = DataConfig(sources=[DataSourceConfig(path=str(shards))], batch_size_per_gpu=8,
                      num_workers=1)
    b = next(iter(SampleLoader(data, 0, 0, 1, ImageTextBatches(ImageTextConfig(
        size=16, scale=[0.5, 1.0]), 16))))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])


def test_bad_image_text_config():
    with pytest.raises(ConfigError, match="image.scale"):
        ImageTextConfig(scale=[0.0, 1.0])
    with pytest.raises(ConfigError, match="image.ratio"):
        ImageTextConfig(ratio=[2.0, 1.0])
