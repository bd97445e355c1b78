"""Image folders (``DIR/<class>/<image>``) loaded into memory, preprocessed for evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinosys.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageSet:
    """Preprocessed images (n, 3, S, S), their labels (n,) and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


def folder_samples(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``(path, label)`` pairs and sorted class names of ``root/<class>/<image>``."""
    try:
        from dinosys.data.folder import ImageFolder
    except ImportError:
        ImageFolder = None  # noqa: N806
    if not root.is_dir():
        raise UserError(f"image folder not found: {root} (expected DIR/<class>/<image>)")
    if ImageFolder is not None:
        folder = ImageFolder(root)
        samples = [(Path(p), int(label)) for p, label in folder.samples]
        classes = list(folder.classes)
    else:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        samples = [(p, label) for label, c in enumerate(classes)
                   for p in sorted((root / c).iterdir())
                   if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise UserError(f"no images under {root} (expected DIR/<class>/<image>)")
    return samples, classes


def preprocess(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
               ) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic), centre-crop ``size``, normalise: (3, S, S)."""
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


_CACHE: dict[tuple, ImageSet] = {}


def load_image_folder(root: Path, size: int, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD, cache: bool = True) -> ImageSet:
    """Every image of ``root/<class>/`` preprocessed into one tensor (cached per process)."""
    root = Path(root)
    key = (str(root.resolve()), size, tuple(mean), tuple(std))
    if cache and key in _CACHE:
        return _CACHE[key]
    samples, classes = folder_samples(root)
    images = torch.empty(len(samples), 3, size, size)
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as img:
                images[i] = preprocess(img, size, mean, std)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read image {path}: {exc}") from exc
    result = ImageSet(images, torch.tensor([label for _, label in samples]), classes)
    if cache:
        _CACHE[key] = result
    return result
