"""Train a small copy-detection backbone (SSCD-style): a dinosys ViT learns to map an image and its
copy augmentations (crop, resize, JPEG, colour shift, small rotation, overlaid text/boxes) to the
same embedding, with an InfoNCE loss over the batch, then is exported with
``dinosys.export.save_native`` so ``embed.model`` can point at it.

DINOv2 deduplicated with SSCD copy-detection embeddings; this is the small, offline version used
by the tests and demos when no trained copy-detection model is at hand.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance

from dinosys.eval.images import preprocess

log = logging.getLogger(__name__)


def copy_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random copy transformation chain (what a re-upload of an image typically does)."""
    w, h = img.size
    s = rng.uniform(0.6, 1.0)
    cw, ch = max(8, int(w * s)), max(8, int(h * s))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        f = rng.uniform(0.3, 1.0)
        img = img.resize((max(8, int(img.width * f)), max(8, int(img.height * f))), Image.BILINEAR)
    if rng.random() < 0.5:
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.4))
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.4, 1.5))
    if rng.random() < 0.3:
        img = img.rotate(rng.uniform(-10, 10), resample=Image.BICUBIC)
    if rng.random() < 0.3:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.4:
        d = ImageDraw.Draw(img)
        x, y = rng.uniform(0, 0.7) * img.width, rng.uniform(0, 0.8) * img.height
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.text((x, y), f"copy {int(rng.integers(1000))}", fill=colour)
        else:
            d.rectangle((x, y, x + img.width * 0.2, y + img.height * 0.1), fill=colour)
    if rng.random() < 0.5:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(20, 90)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def train_copy_backbone(images: Sequence[Image.Image], out_dir: Path, steps: int = 300,
                        batch_size: int = 48, img_size: int = 48, arch: str = "vit_tiny",
                        patch_size: int = 8, embed_dim: int = 128, depth: int = 4,
                        num_heads: int = 4, lr: float = 2e-3, temperature: float = 0.1,
                        seed: int = 0, max_seconds: float | None = None,
                        device: str | None = None) -> dict:
    """Train a copy-detection backbone on ``images`` and export it to ``out_dir``."""
    from dinosys.export import save_native
    from dinosys.models import create_backbone

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_backbone(arch, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                            depth=depth, num_heads=num_heads).to(dev)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.time()
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(images), size=min(batch_size, len(images)), replace=False)
        views = [torch.stack([preprocess(copy_augment(images[i], rng), img_size, mean, std)
                              for i in idx]) for _ in range(2)]
        out = model(torch.cat(views).to(dev))
        z = torch.cat([F.normalize(out["x_norm_clstoken"], dim=-1),
                       F.normalize(out["x_norm_patchtokens"].mean(1), dim=-1)], -1)
        z = F.normalize(z, dim=-1)
        a, b = z.chunk(2)
        logits = a @ b.T / temperature
        target = torch.arange(len(a), device=dev)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if max_seconds is not None and time.time() - start > max_seconds:
            break
    model.eval().cpu()
    save_native(model, Path(out_dir), card={
        "purpose": "copy detection (curation dedup)",
        "objective": "InfoNCE over copy augmentations",
        "steps": len(losses), "train_images": len(images)})
    return {"steps": len(losses), "first_loss": losses[0],
            "last_loss": float(np.mean(losses[-10:])),
            "seconds": round(time.time() - start, 1)}


TRAIN_PHOTOS = ("motorcycle_left", "motorcycle_right")  # never planted by the quality test


def training_images(builtin_dir: Path, n_mnist: int = 400, crops_per_photo: int = 100,
                    seed: int = 0) -> list[Image.Image]:
    """Training images from the embedded data (``dinosys data builtin``): MNIST train digits and
    random crops of photos that the quality test does not use as planted originals."""
    rng = np.random.default_rng(seed)
    mnist = sorted((builtin_dir / "mnist" / "train").rglob("*.png"))[::10][:n_mnist]
    images = [Image.open(p).convert("RGB").resize((64, 64), Image.BICUBIC) for p in mnist]
    for name in TRAIN_PHOTOS:
        img = Image.open(next((builtin_dir / "photos").glob(f"{name}.*"))).convert("RGB")
        w, h = img.size
        for _ in range(crops_per_photo):
            s = rng.uniform(0.2, 0.6)
            cw, ch = int(w * s), int(h * s)
            x0, y0 = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            images.append(img.crop((x0, y0, x0 + cw, y0 + ch)))
    return images


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m curation.copy_train OUT [--data DIR] [--steps N]``: train + export."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="train a small copy-detection backbone and export it")
    p.add_argument("out", help="export directory to write")
    p.add_argument("--data", default="data/builtin", help="embedded data (dinosys data builtin)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--max-seconds", type=float, default=None)
    args = p.parse_args(argv)
    from dinosys.data.builtin import build_builtin

    build_builtin(Path(args.data))
    info = train_copy_backbone(training_images(Path(args.data)), Path(args.out), steps=args.steps,
                               batch_size=64, max_seconds=args.max_seconds)
    print(json.dumps(info, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
