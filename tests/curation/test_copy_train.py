"""The copy-detection trainer and the detector shipped with dinosys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from curation.backbone import BUILTIN_COPY_DETECTOR, extract, load_feature_model
from curation.copy_train import (
    HELD_OUT_SKIMAGE,
    LFW_HELD_OUT_FACES,
    LFW_TRAIN_FACES,
    SHIPPED,
    TRAIN_SKIMAGE,
    copy_augment,
    margin_loss,
    train_copy_backbone,
    training_images,
)
from curation.demo_pool import ORIGINALS
from dinosys.eval.images import preprocess


def test_training_images_are_disjoint_from_the_quality_pool() -> None:
    train = {Path(name).stem for name in TRAIN_SKIMAGE}
    assert not train & set(ORIGINALS)
    assert not train & {Path(name).stem for name in HELD_OUT_SKIMAGE}
    assert not set(LFW_TRAIN_FACES) & set(LFW_HELD_OUT_FACES)
    domains = training_images(n_collages=50)
    assert set(domains) == {"photos", "faces", "synthetic", "collages"}
    assert len(domains["collages"]) == 50 and len(domains["faces"]) == len(LFW_TRAIN_FACES)
    assert all(min(img.size) >= 16 for images in domains.values() for img in images)


def test_copy_augment_is_seeded_and_changes_the_image(builtin_data: Path) -> None:
    img = Image.open(builtin_data / "photos" / "retina.png").convert("RGB")
    a = copy_augment(img, np.random.default_rng(3))
    b = copy_augment(img, np.random.default_rng(3))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != img.size or not np.array_equal(np.asarray(a), np.asarray(img))


def test_margin_loss_penalises_close_negatives_and_far_positives() -> None:
    za = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    assert margin_loss(za, za.clone(), neg_margin=1.0, pos_margin=0.5) == 0
    close = torch.nn.functional.normalize(za[:1].repeat(6, 1) + 0.01 * torch.randn(6, 16), dim=-1)
    assert margin_loss(close, close.clone(), neg_margin=0.3, pos_margin=0.5) > 1
    assert margin_loss(za, -za, neg_margin=1.0, pos_margin=0.5) > 0


def test_train_exports_a_loadable_detector(tmp_path: Path) -> None:
    domains = {k: v[:12] for k, v in training_images(n_collages=12).items()}
    info = train_copy_backbone(domains, tmp_path / "det", steps=4, batch_size=8, img_size=32,
                               embed_dim=32, depth=1, num_heads=2, workers=0, progress=False)
    assert info["steps"] == 4 and np.isfinite(info["last_loss"])
    assert "copy detection" in (tmp_path / "det" / "README.md").read_text()
    fm = load_feature_model(str(tmp_path / "det"))
    images = domains["collages"][:3]
    x = torch.stack([preprocess(img, 32, fm.mean, fm.std) for img in images])
    emb = extract(fm, x, "cls_avgpool", 1)
    assert emb.shape == (3, 64)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_copy_train_command_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "curation.copy_train", str(tmp_path / "det"),
                          "--steps", "2", "--batch-size", "8", "--workers", "0",
                          "--img-size", "32", "--patch-size", "16", "--embed-dim", "48",
                          "--depth", "2", "--heads", "3", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["steps"] == 2
    cfg = json.loads((tmp_path / "det" / "config.json").read_text())["architecture"]
    assert (cfg["img_size"], cfg["patch_size"], cfg["embed_dim"], cfg["depth"]) == (32, 16, 48, 2)


def test_shipped_detector_loads_by_name_and_matches_a_copy(builtin_data: Path) -> None:
    assert (SHIPPED / "model.safetensors").is_file()
    fm = load_feature_model(BUILTIN_COPY_DETECTOR)
    photo = Image.open(builtin_data / "photos" / "astronaut.png").convert("RGB")
    other = Image.open(builtin_data / "photos" / "coffee.png").convert("RGB")
    copy = photo.resize((photo.width // 2, photo.height // 2))
    x = torch.stack([preprocess(img, 48, fm.mean, fm.std) for img in (photo, copy, other)])
    emb = extract(fm, x, "cls_avgpool", 1)
    sims = emb @ emb.T
    assert sims[0, 1] > 0.9 and sims[0, 2] < 0.6
