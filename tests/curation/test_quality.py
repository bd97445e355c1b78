"""Acceptance test: dedup removes >= 95% of planted near-copies of the shipped photos with >= 99%
precision, through the whole `dinosys-curate run` pipeline with a project-trained backbone.

The backbone is ``$DINOSYS_CURATION_MODEL`` (any dinosys run/export directory) when set, else the
cached small copy-detection ViT trained by ``python -m curation.copy_train`` (InfoNCE over copy
augmentations, on images disjoint from the planted photos, exported with ``save_native``).
A random-init export is not a usable copy detector (all images land near cosine 1).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageDraw, ImageEnhance

from curation.cli import main

ORIGINALS = ("astronaut", "chelsea", "china", "coffee", "flower", "hubble_deep_field",
             "immunohistochemistry", "rocket")
CACHE = Path(os.environ.get("DINOSYS_TEST_CACHE", Path(__file__).resolve().parents[2]
                            / ".cache" / "tests"))


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def near_copies(img: Image.Image) -> dict[str, Image.Image]:
    """Crop, resize, JPEG re-encode, colour shift, small rotation, text overlay."""
    w, h = img.size
    text = img.copy()
    draw = ImageDraw.Draw(text)
    draw.text((w * 0.1, h * 0.1), "COPYRIGHT 2026", fill=(255, 255, 0))
    draw.rectangle((w * 0.6, h * 0.8, w * 0.9, h * 0.9), fill=(255, 0, 0))
    return {
        "crop": img.crop((int(w * 0.1), int(h * 0.1), int(w * 0.9), int(h * 0.9))),
        "resize": img.resize((w // 2, h // 2), Image.BILINEAR),
        "jpeg": _jpeg(img, 25),
        "colour": ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(1.3)).enhance(0.6),
        "rotate": img.rotate(7, resample=Image.BICUBIC),
        "text": text,
    }


def _digits_rgb(arr: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(arr.astype(np.uint8)).resize((size, size), Image.BICUBIC).convert("RGB")


@pytest.fixture(scope="session")
def copy_model() -> Path:
    """A project-trained copy-detection backbone (exported directory).

    Training it takes longer than a CI test may run on 2 shared CPU cores, so it is trained once
    (``python -m curation.copy_train .cache/tests/copy_model_v1``, or on a GPU) and cached.
    """
    env = os.environ.get("DINOSYS_CURATION_MODEL")
    if env:
        return Path(env)
    out = CACHE / "copy_model_v1"
    if not (out / "config.json").is_file():
        pytest.skip(f"no trained copy-detection model: set DINOSYS_CURATION_MODEL or run "
                    f"`python -m curation.copy_train {out}` once")
    return out


def build_pool(root: Path, builtin_data: Path) -> tuple[Path, set[str]]:
    """Originals + planted near-copies + unrelated images (MNIST/digits, other photos' tiles)."""
    pool = root / "pool"
    pool.mkdir(parents=True)
    copies: set[str] = set()
    photos = builtin_data / "photos"
    for name in ORIGINALS:
        img = Image.open(next(photos.glob(f"{name}.*"))).convert("RGB")
        img.thumbnail((192, 192))
        img.save(pool / f"a_{name}.png")  # sorts first: the original is the kept representative
        for kind, cp in near_copies(img).items():
            cp.save(pool / f"b_{name}_{kind}.png")
            copies.add(f"b_{name}_{kind}.png")
    mnist = sorted((builtin_data / "mnist" / "val").rglob("*.png"))
    for p in mnist[:: max(1, len(mnist) // 150)][:150]:
        name = f"c_mnist_{p.parent.name}_{p.stem}.png"
        _digits_rgb(np.asarray(Image.open(p)), 84).save(pool / name)
    digits = sorted((builtin_data / "digits" / "val").rglob("*.png"))[:40]
    for p in digits:
        name = f"d_digits_{p.parent.name}_{p.stem}.png"
        _digits_rgb(np.asarray(Image.open(p)), 64).save(pool / name)
    return pool, copies


@pytest.mark.slow
def test_dedup_removes_planted_copies(tmp_path: Path, builtin_data: Path,
                                     copy_model: Path) -> None:
    pool, copies = build_pool(tmp_path, builtin_data)
    out = tmp_path / "work"
    cfg = {"name": "quality", "out": str(out), "progress": False,
           "sources": [{"path": str(pool), "name": "pool"}],
           "embed": {"model": str(copy_model), "img_size": 48, "batch_size": 32,
                     "num_workers": 0, "chunk_size": 256},
           "dedup": {"k": 16, "threshold": 0.6},
           "cluster": {"levels": [8], "n_iter": 5, "n_resample": 0}}
    path = tmp_path / "quality.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    m = pq.read_table(out / "shards" / "manifest.parquet").to_pydict()
    names = [Path(p).name for p in m["path"]]
    removed = {n for n, r in zip(names, m["reason"]) if r.startswith("near_duplicate")}
    recall = len(removed & copies) / len(copies)
    precision = len(removed & copies) / max(1, len(removed))
    print(f"planted copies {len(copies)}, removed {len(removed)}, recall {recall:.3f}, "
          f"precision {precision:.3f}")
    assert recall >= 0.95, sorted(copies - removed)
    assert precision >= 0.99, sorted(removed - copies)
