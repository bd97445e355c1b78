"""Image folders (``ROOT/<class>/<image>``) and file lists (``.txt``: ``path [label]`` per line)."""

from __future__ import annotations

import os
from pathlib import Path

from dinosys.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff",
                    ".gif")


def is_image_file(name: str) -> bool:
    """True when the file name has a known image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(directory: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames)
                     if is_image_file(f) and not f.startswith("."))
    return found


class ImageFolder:
    """``ROOT/<class>/<image>`` (images found recursively inside each class, sorted).

    ``samples`` is a list of (path, label) with labels indexing the sorted ``classes``. With
    ``allow_flat=True`` a folder of images without class folders is accepted (labels -1).
    """

    def __init__(self, root: str | os.PathLike, allow_flat: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"image folder not found: {self.root} (expected ROOT/<class>/<image>)")
        class_dirs = sorted(p for p in self.root.iterdir()
                            if p.is_dir() and not p.name.startswith("."))
        self.classes = [p.name for p in class_dirs]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        samples: list[tuple[Path, int]] = []
        for label, cdir in enumerate(class_dirs):
            samples.extend((p, label) for p in _images_under(cdir))
        if not samples and allow_flat:
            self.classes, self.class_to_idx = [], {}
            samples = [(p, -1) for p in sorted(self.root.iterdir()) if p.is_file()
                       and is_image_file(p.name) and not p.name.startswith(".")]
        if not samples:
            raise UserError(f"no images found in {self.root} (expected ROOT/<class>/<image> with "
                            f"extensions {', '.join(IMAGE_EXTENSIONS)})")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Path, int]:
        return self.samples[index]

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order."""
        return [label for _, label in self.samples]


def read_file_list(path: str | os.PathLike) -> list[tuple[Path, int]]:
    """Parse a ``.txt`` list: one image path per line, optionally followed by an integer label.

    Relative paths are relative to the list's folder; blank lines and ``#`` comments are skipped.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read file list {path}: {exc.strerror}") from exc
    items: list[tuple[Path, int]] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label = -1
        if len(parts) == 2:
            try:
                label = int(parts[1])
                line = parts[0]
            except ValueError:
                pass  # a path with a space in it, no label
        p = Path(line)
        if not p.is_absolute():
            p = path.parent / p
        if label < -1:
            raise UserError(f"{path}:{lineno}: label must be >= 0, got {label}")
        items.append((p, label))
    if not items:
        raise UserError(f"file list {path} holds no image paths")
    return items
