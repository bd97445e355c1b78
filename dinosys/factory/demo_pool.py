"""The demo's raw pool: the embedded MNIST train images with planted near-duplicates and
planted copies of the evaluation (val) images, as WebDataset shards with captions.

``pool/{000000..}.tar`` holds ``<key>.png`` + ``<key>.txt`` (the builtin caption) per image;
``pool/planted_keys.json`` is the ground truth the demo checks the curation against:
``near_duplicates`` (key -> the train key it copies) and ``contamination`` (key -> the val file
it copies). Near-duplicates are photometric re-encodings of a train image (brightness, contrast,
light noise, JPEG at quality 60, saved as PNG); contamination copies are val images, exact or
with the same edits. Geometric edits are not planted: a 1-pixel shift of a 28x28 digit moves it
further (pixel cosine ~0.45, the shipped copy detector ~0.6) than the nearest digit of another
writer is (0.98), so no embedding can call it a copy without also removing real digits.
Everything is seeded, so a rebuild writes the same pool.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from dinosys.atomic import atomic_directory, write_atomic
from dinosys.data.captions import digit_caption
from dinosys.data.shard_writer import ShardWriter, encode_image

PLANTED_KEYS = "planted_keys.json"  # not curation's planted.json: that one lists pool files
EDITS = ("brightness", "contrast", "noise", "jpeg")


def edit(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """One near-duplicate edit of a grey 28x28 digit."""
    if kind == "brightness":
        return ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 0.9)))
    if kind == "contrast":
        return ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.6, 0.85)))
    if kind == "noise":
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, size=img.size[::-1])
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=60)
        return Image.open(io.BytesIO(buf.getvalue())).convert("L")
    if kind == "exact":
        return img.copy()
    raise ValueError(f"unknown edit {kind!r}")


def _train_samples(shards: Path) -> list[tuple[str, bytes, str]]:
    """(key, png bytes, caption) of every sample in the builtin MNIST shards, in key order."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as fh:
            for member in fh.getmembers():
                key, _, ext = member.name.partition(".")
                data = fh.extractfile(member)
                if data is not None and ext in ("png", "txt"):
                    samples.setdefault(key, {})[ext] = data.read()
    return [(k, v["png"], v["txt"].decode()) for k, v in sorted(samples.items())
            if "png" in v and "txt" in v]


def build_demo_pool(out: Path, builtin: Path, near_duplicates: int = 200,
                    contamination: int = 100, seed: int = 0) -> dict:
    """Write the pool into ``out`` (atomically) and return its counts and planted lists."""
    train = _train_samples(builtin / "shards" / "mnist")
    train = [s for s in train if "_train_" in s[0]]
    val = sorted((builtin / "mnist" / "val").glob("*/*.png"))
    if not train or not val:
        raise FileNotFoundError(f"no MNIST train shards / val images under {builtin}")
    rng = np.random.default_rng(seed)
    planted_dup: dict[str, str] = {}
    planted_con: dict[str, str] = {}
    with atomic_directory(Path(out)) as tmp:
        with ShardWriter(tmp, max_count=1000) as writer:
            for key, png, caption in train:
                writer.write({"__key__": key, "png": png, "txt": caption})
            for n, i in enumerate(rng.choice(len(train), near_duplicates, replace=False)):
                key, png, caption = train[int(i)]
                img = Image.open(io.BytesIO(png)).convert("L")
                new = f"planted_dup_{n:04d}"
                writer.write({"__key__": new, "txt": caption,
                              "png": encode_image(edit(img, EDITS[n % len(EDITS)], rng))})
                planted_dup[new] = key
            for n, i in enumerate(rng.choice(len(val), contamination, replace=False)):
                path = val[int(i)]
                label = int(path.parent.name)
                img = Image.open(path).convert("L")
                kind = ("exact", *EDITS)[n % (len(EDITS) + 1)]
                new = f"planted_val_{n:04d}"
                writer.write({"__key__": new, "txt": digit_caption("mnist_val", n, label),
                              "png": encode_image(edit(img, kind, rng))})
                planted_con[new] = str(path.relative_to(builtin))
        write_atomic(tmp / PLANTED_KEYS, json.dumps(
            {"near_duplicates": planted_dup, "contamination": planted_con}, indent=1) + "\n")
    return {"pool": str(out), "images": len(train) + near_duplicates + contamination,
            "train_images": len(train), "planted_near_duplicates": near_duplicates,
            "planted_contamination": contamination}
