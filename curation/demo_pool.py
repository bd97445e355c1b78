"""A pool with planted near-copies, for the curation demo and the dedup quality test.

Eight of the embedded photos (``dinosys data builtin``) each get six near-copies (crop, resize,
JPEG re-encode, colour shift, small rotation, text overlay), mixed with distinct unrelated
images that the shipped copy detector never trained on: held-out scikit-image pictures,
collages of crops of those pictures and of faces (natural local statistics; two collages share
textures and often a tile, and differ in layout), synthetic shape compositions drawn with a seed
the detector never saw, and held-out LFW faces.

Ground truth: a collage that showed most of a pool image in one tile would be a copy of it (a
crop pasted into a mosaic is a copy under the ISC 2021 definition), and counting its removal as
a false positive would be wrong. So the faces that stand alone in the pool are never collage
material, and a tile shows at most half the side (a quarter of the area) of a held-out picture.

Handwritten digits are not used as single images: different MNIST "1"s correlate at up to 0.96
in raw pixels, more than a planted crop does with its original (0.4-0.9), so "not a copy" is
not a ground truth for them.

    dinosys-curate demo-pool --out data/curation_demo_pool [--data data/builtin]
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from curation.copy_train import (
    HELD_OUT_SKIMAGE,
    LFW_HELD_OUT_FACES,
    collage,
    lfw_images,
    skimage_data_dir,
    synthetic_image,
)

ORIGINALS = ("astronaut", "chelsea", "china", "coffee", "flower", "hubble_deep_field",
             "immunohistochemistry", "rocket")
SEED = 20261123
# the held-out LFW faces: half stand alone in the pool, half are only collage material
POOL_FACES = LFW_HELD_OUT_FACES[:25]
COLLAGE_FACES = LFW_HELD_OUT_FACES[25:]


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


def build_pool(out: Path, builtin_dir: Path, n_collages: int = 150,
               n_synthetic: int = 100) -> set[str]:
    """Write the pool to ``out`` (atomically: a temporary sibling renamed at the end) and
    ``planted.json``; return the planted copies' file names. Originals are named ``a_*`` and
    sort before their copies ``b_*``, so the default representative is the original."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copies: set[str] = set()
    for name in ORIGINALS:
        img = Image.open(next((builtin_dir / "photos").glob(f"{name}.*"))).convert("RGB")
        img.thumbnail((192, 192))
        img.save(tmp / f"a_{name}.png")
        for kind, cp in near_copies(img).items():
            cp.save(tmp / f"b_{name}_{kind}.png")
            copies.add(f"b_{name}_{kind}.png")
    rng = np.random.default_rng(SEED)
    pictures = [Image.open(skimage_data_dir() / n).convert("RGB") for n in HELD_OUT_SKIMAGE]
    faces = lfw_images(POOL_FACES, 96)
    collage_faces = lfw_images(COLLAGE_FACES, 96)
    for name, img in zip(HELD_OUT_SKIMAGE, pictures):
        img = img.copy()
        img.thumbnail((256, 256))
        img.save(tmp / f"c_skimage_{Path(name).stem}.png")
    for i in range(n_collages):
        collage(pictures + collage_faces, rng, 0.2, 0.5).save(tmp / f"d_collage_{i:03d}.png")
    for i in range(n_synthetic):
        synthetic_image(rng, 128).save(tmp / f"e_synthetic_{i:03d}.png")
    for row, img in zip(POOL_FACES, faces):
        img.save(tmp / f"f_face_{row:03d}.png")
    (tmp / "planted.json").write_text(json.dumps(sorted(copies), indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return copies
