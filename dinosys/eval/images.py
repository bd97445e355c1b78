"""Evaluation image folders (``DIR/<class>/<image>``): resize + centre-crop + normalise.

An :class:`ImageSet` describes a folder; its pixels are decoded on demand in DataLoader workers,
so evaluation sets of any size stream through the model. Small sets (by default up to 1 GiB of
preprocessed pixels, e.g. MNIST for the periodic kNN during training) are decoded once and kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.data.decode import BadImageError, decode_image
from dinosys.data.folder import ImageFolder
from dinosys.errors import UserError

MAX_PIXELS = 178_956_970  # twice Pillow's bomb limit: evaluation images are trusted folders
PRELOAD_BYTES = 1 << 30


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


class _FolderImages(Dataset):
    """(preprocessed image, label, error) of each sample: an unreadable image gives zeros and
    its error text, which :meth:`ImageSet.batches` raises as one UserError line in the main
    process (raised in a DataLoader worker, it would carry the worker's whole traceback)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], size: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.samples, self.size, self.mean, self.std = list(samples), size, mean, std

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        path, label = self.samples[i]
        try:
            img = decode_image(Path(path).read_bytes(), MAX_PIXELS, draft_size=(self.size,) * 2)
        except (OSError, BadImageError) as exc:
            error = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return torch.zeros(3, self.size, self.size), label, \
                f"cannot read evaluation image {path}: {error}"
        return preprocess(img, self.size, self.mean, self.std), label, ""


@dataclass
class ImageSet:
    """An evaluation folder: samples, labels, class names and its preprocessing."""

    samples: list[tuple[Path, int]]
    classes: list[str]
    size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    images: torch.Tensor | None = field(default=None, repr=False)  # preloaded (n, 3, S, S)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def n_batches(self, batch_size: int) -> int:
        """How many batches of ``batch_size`` the set has (the last one may be short)."""
        return -(-len(self.samples) // batch_size)

    def batches(self, batch_size: int, num_workers: int | None = None,
                shard: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
        """Preprocessed images in order, ``batch_size`` at a time (parallel decode).

        ``shard=(rank, world)``: only batches ``rank, rank + world, ...`` of the whole set, so
        ``world`` processes together see exactly the batches one process would (same images in
        each batch, hence bitwise the same features).
        """
        rank, world = shard
        mine = range(rank, self.n_batches(batch_size), world)
        if self.images is not None:
            for b in mine:
                yield self.images[b * batch_size:(b + 1) * batch_size]
            return
        if num_workers is None:
            num_workers = min(8, max(0, (os.cpu_count() or 1) - 1))
        indices = [i for b in mine
                   for i in range(b * batch_size, min((b + 1) * batch_size, len(self.samples)))]
        dataset = Subset(_FolderImages(self.samples, self.size, self.mean, self.std), indices)
        for images, _, errors in DataLoader(dataset, batch_size=batch_size,
                                            num_workers=num_workers,
                                            pin_memory=torch.cuda.is_available()):
            bad = [e for e in errors if e]
            if bad:
                more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
                raise UserError(bad[0] + more)
            yield images

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """The images at ``indices`` (in that order), same classes and preprocessing."""
        idx = [int(i) for i in indices]
        images = self.images[idx] if self.images is not None else None
        return ImageSet([self.samples[i] for i in idx], self.classes, self.size, self.mean,
                        self.std, images)

    def preload(self) -> ImageSet:
        """Decode every image once and keep the tensor (small sets only)."""
        if self.images is None:
            self.images = torch.cat(list(self.batches(256))) if self.samples else None
        return self


def load_image_folder(root: Path, size: int, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD,
                      preload_bytes: int = PRELOAD_BYTES) -> ImageSet:
    """The folder ``root/<class>/<image>`` as an :class:`ImageSet`; preloaded when its
    preprocessed pixels take at most ``preload_bytes``. Inside
    :func:`dinosys.eval.feature_cache.shared_features` each folder is decoded once."""
    from dinosys.eval.feature_cache import active_cache

    cache = active_cache()
    if cache is not None:
        return cache.folder(root, size, tuple(mean), tuple(std), lambda: _load_image_folder(
            root, size, mean, std, preload_bytes))
    return _load_image_folder(root, size, mean, std, preload_bytes)


def _load_image_folder(root: Path, size: int, mean: Sequence[float], std: Sequence[float],
                       preload_bytes: int) -> ImageSet:
    folder = ImageFolder(root)  # raises UserError for a missing or empty folder
    samples = [(Path(p), int(label)) for p, label in folder.samples]
    image_set = ImageSet(samples, list(folder.classes), size, tuple(mean), tuple(std))
    if len(samples) * 3 * size * size * 4 <= preload_bytes:
        image_set.preload()
    return image_set


def load_class_folders(model: object, train: str | Path, val: str | Path
                       ) -> tuple[ImageSet, ImageSet]:
    """Train and val folders preprocessed for ``model`` (an EvalModel: ``image_size``,
    ``mean``, ``std``); UserError unless both have the same class folders, at least two."""
    size, mean, std = model.image_size, model.mean, model.std  # type: ignore[attr-defined]
    train_set = load_image_folder(Path(train), size, mean, std)
    val_set = load_image_folder(Path(val), size, mean, std)
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise UserError(f"train and val folders have different classes: only in {train}: "
                        f"{only_train or 'none'}, only in {val}: {only_val or 'none'}")
    if len(train_set.classes) < 2:
        raise UserError(f"{train} has {len(train_set.classes)} class folder; classification "
                        "needs at least two")
    return train_set, val_set
