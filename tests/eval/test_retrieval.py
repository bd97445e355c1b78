"""``eval retrieval``: recall@k both ways on captioned shards; captionless samples counted."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dinosys.data.shard_writer import ShardWriter
from dinosys.errors import UserError
from dinosys.eval.models import EvalModel
from dinosys.eval.registry import run_evaluator
from tests.eval.test_zeroshot import BrightnessModel


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_retrieval_recall_and_skips(tmp_path):
    with ShardWriter(tmp_path / "shards", max_count=4) as writer:
        for i in range(10):
            sample = {"__key__": f"k{i}", "png": _png(230 if i % 2 else 20)}
            if i < 8:
                sample["txt"] = "a bright photo" if i % 2 else "a dark photo"
            elif i == 8:
                sample["txt"] = b"\xff\xfe not utf-8"
            writer.write(sample)
    model = EvalModel(BrightnessModel(), "brightness", 8, (0.5,) * 3, (0.25,) * 3)
    out = run_evaluator("retrieval", model, data=str(tmp_path / "shards"))
    assert out["n_images"] == 8 and out["n_texts"] == 2  # repeated captions are one text
    assert out["skipped"] == {"no_text": 1, "bad_text": 1}
    m = out["metrics"]
    assert m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == 1.0
    assert set(m) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image")
                      for k in (1, 5, 10)}


def test_retrieval_on_builtin_caption_shards(builtin_data):
    from dinosys.models.clip import CLIPModel, ClipModelConfig, ImageTowerConfig
    from dinosys.models.text import TextConfig
    from dinosys.models.vit import BackboneConfig

    bb = BackboneConfig(arch="vit_tiny", img_size=28, patch_size=14, embed_dim=32, depth=1,
                        num_heads=2)
    model = CLIPModel(ClipModelConfig(embed_dim=16, image=ImageTowerConfig(backbone=bb),
                                      text=TextConfig(width=32, layers=1, heads=2)))
    out = run_evaluator("retrieval", EvalModel.wrap(model),
                        data=str(builtin_data / "shards" / "mnist"), max_samples=300)
    assert out["n_images"] == 300 and 10 <= out["n_texts"] <= 100 and out["skipped"] == {}
    assert all(0.0 <= v <= 1.0 for v in out["metrics"].values())


def test_retrieval_bad_input(tmp_path, tiny_export):
    with pytest.raises(UserError, match="needs an image-text model"):
        run_evaluator("retrieval", EvalModel.load(tiny_export), data=str(tmp_path))
    with ShardWriter(tmp_path / "nocap", max_count=4) as writer:
        for i in range(3):
            writer.write({"__key__": f"k{i}", "png": _png(i)})
    model = EvalModel(BrightnessModel(), "b", 8)
    with pytest.raises(UserError, match="0 usable image-text pairs"):
        run_evaluator("retrieval", model, data=str(tmp_path / "nocap"))
