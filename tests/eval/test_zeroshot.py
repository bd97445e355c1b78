"""``eval zeroshot``: class names from folders, prompts through the text tower, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dinosys.data.tokenizer import get_tokenizer
from dinosys.errors import UserError
from dinosys.eval.models import EvalModel
from dinosys.eval.registry import run_evaluator
from dinosys.models.clip import CLIPModel, ClipModelConfig, ImageTowerConfig
from dinosys.models.text import TextConfig
from dinosys.models.vit import BackboneConfig


class BrightnessModel(nn.Module):
    """An image-text model that sees brightness: images -> [bright, dark]; a text -> the
    word it names ("bright" or "dark" token). Zero-shot must then be exact."""

    image_size = 8

    def __init__(self) -> None:
        super().__init__()
        tok = get_tokenizer()
        self.bright, self.dark = tok.encode("bright")[0], tok.encode("dark")[0]
        self.text = nn.Module()
        self.text.context_length = 77
        self.anchor = nn.Parameter(torch.zeros(1))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m], dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        b = (tokens == self.bright).any(1).float()
        d = (tokens == self.dark).any(1).float()
        return torch.stack([b, d], dim=1) + 0.01


def _folders(root: Path) -> Path:
    for name, value in (("bright", 230), ("dark", 20)):
        (root / name).mkdir(parents=True)
        for i in range(4):
            arr = np.full((8, 8, 3), value + i, dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def test_zeroshot_reads_classes_from_folders_and_is_exact(tmp_path):
    val = _folders(tmp_path / "val")
    model = EvalModel(BrightnessModel(), "brightness", 8, (0.5,) * 3, (0.25,) * 3)
    templates = tmp_path / "t.txt"
    templates.write_text("a {} photo.\nsomething {}\n")
    out = run_evaluator("zeroshot", model, val=str(val), templates=str(templates))
    assert out["metrics"]["top1"] == 1.0 and out["metrics"]["mean_per_class_recall"] == 1.0
    assert out["per_class_recall"] == {"bright": 1.0, "dark": 1.0}
    assert out["n_templates"] == 2 and out["n_val"] == 8


def test_zeroshot_with_a_real_clip_model(tmp_path):
    val = _folders(tmp_path / "val")
    torch.manual_seed(0)
    bb = BackboneConfig(arch="vit_tiny", img_size=8, patch_size=4, embed_dim=32, depth=1,
                        num_heads=2)
    model = CLIPModel(ClipModelConfig(embed_dim=16, image=ImageTowerConfig(backbone=bb),
                                      text=TextConfig(width=32, layers=1, heads=2)))
    out = run_evaluator("zeroshot", EvalModel.wrap(model), val=str(val))
    assert 0.0 <= out["metrics"]["top1"] <= 1.0 and out["metrics"]["top5"] == 1.0
    assert out["n_templates"] == 7


def test_zeroshot_bad_input(tmp_path):
    val = _folders(tmp_path / "val")
    from dinosys.models import create_backbone

    vit = EvalModel.wrap(create_backbone("vit_tiny", img_size=8, patch_size=4, depth=1))
    with pytest.raises(UserError, match="needs an image-text model"):
        run_evaluator("zeroshot", vit, val=str(val))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no templates"):
        run_evaluator("zeroshot", EvalModel(BrightnessModel(), "b", 8), val=str(val),
                      templates=str(empty))
