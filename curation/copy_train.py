"""Train a small copy-detection backbone (SSCD-style): a dinosys ViT learns to map an image and its
copy augmentations (crop, resize, JPEG, colour shift, small rotation, overlaid text/boxes) to the
same embedding, with an InfoNCE loss over the batch, the KoLeo regulariser (SSCD's entropy
term, which spreads unrelated images apart) and squared hinges on absolute similarities (what
dedup thresholds), then is exported with ``dinosys.export.save_native`` so ``embed.model`` can
point at it (the shipped one as ``builtin:copy_detector``).

DINOv2 deduplicated with SSCD copy-detection embeddings; this is the small, offline version that
ships with dinosys (``curation/assets/copy_detector``) for demos and the curation quality test.
It is trained only on images that the quality test never plants or mixes into its pool.

    python -m curation.copy_train OUT                  # the shipped detector: 2,400 steps, 22 min
    python -m curation.copy_train OUT --init DIR --lr 3e-4   # continue training an export
    python -m curation.copy_train OUT --img-size 128 --patch-size 16 --embed-dim 384 --depth 12 \
        --heads 6 --batch-size 512 --workers 12 --steps 20000     # a stronger one, on a GPU
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance
from torch.utils.data import DataLoader, IterableDataset

from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.eval.images import preprocess

log = logging.getLogger(__name__)

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
SHIPPED = Path(__file__).resolve().parent / "assets" / "copy_detector"

# scikit-image pictures the copy detector trains on (random crops: photos 80 each, textures and
# patterns 30); the quality test draws its planted originals (the builtin photos) and its
# distractors (``HELD_OUT_SKIMAGE``) from the others only.
TRAIN_SKIMAGE = {"motorcycle_left.png": 80, "motorcycle_right.png": 80, "retina.jpg": 80,
                 "brick.png": 30, "grass.png": 30, "gravel.png": 30, "cell.png": 30,
                 "moon.png": 30, "chessboard_RGB.png": 30, "microaneurysms.png": 30}
HELD_OUT_SKIMAGE = ("camera.png", "coins.png", "page.png", "text.png", "horse.png",
                    "clock_motion.png", "color.png", "logo.png", "phantom.png")
# lfw_subset.npy rows 0-99 are faces (50 train, 50 held out); rows 100-199 are near-uniform
# non-face patches, copies of each other to any detector, so neither side uses them.
LFW_TRAIN_FACES = range(0, 50)
LFW_HELD_OUT_FACES = range(50, 100)


def skimage_data_dir() -> Path:
    """scikit-image's bundled sample pictures (no download)."""
    import skimage

    return Path(skimage.__file__).resolve().parent / "data"


def lfw_images(rows: Sequence[int], size: int = 64) -> list[Image.Image]:
    """Rows of scikit-image's bundled 25x25 LFW subset, upscaled to ``size``."""
    arr = np.load(skimage_data_dir() / "lfw_subset.npy")
    return [Image.fromarray((arr[i] * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
            .convert("RGB") for i in rows]


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


def synthetic_image(rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A random composition of coloured shapes and lines on a gradient background."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    bg = (a * (1 - t) + b * t).astype(np.uint8).repeat(size, axis=1)
    img = Image.fromarray(bg if rng.random() < 0.5 else bg.transpose(1, 0, 2).copy())
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, size - 8, 2)
        x1, y1 = x0 + rng.integers(6, size // 2), y0 + rng.integers(6, size // 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            d.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            d.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            d.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 6)))
    return img


def collage(parts: Sequence[Image.Image], rng: np.random.Generator, lo: float = 0.3,
            hi: float = 0.9) -> Image.Image:
    """A grid (2x2 to 3x3) of random crops of ``parts`` (each ``lo`` to ``hi`` of a part's side):
    a new image with natural local statistics whose identity lies in its layout, so colour and
    texture alone cannot match it."""
    rows, cols = int(rng.integers(2, 4)), int(rng.integers(2, 4))
    cell = int(rng.integers(32, 56))
    canvas = Image.new("RGB", (cols * cell, rows * cell))
    for r in range(rows):
        for c in range(cols):
            src = parts[int(rng.integers(len(parts)))]
            tile = _crops(src, 1, rng, lo, hi)[0].resize((cell, cell), Image.BILINEAR)
            canvas.paste(tile, (c * cell, r * cell))
    return canvas


def _crops(img: Image.Image, n: int, rng: np.random.Generator, lo: float = 0.2,
           hi: float = 0.6) -> list[Image.Image]:
    w, h = img.size
    out = []
    for _ in range(n):
        s = rng.uniform(lo, hi)
        cw, ch = max(16, int(w * s)), max(16, int(h * s))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out.append(img.crop((x0, y0, x0 + cw, y0 + ch)))
    return out


def training_images(seed: int = 0, n_collages: int = 2000) -> dict[str, list[Image.Image]]:
    """Training images by domain, all disjoint from what the quality test puts in its pool:
    random crops of scikit-image pictures (photos, textures, patterns), the first half of the LFW
    faces, synthetic shape compositions, and collages of crops of these (the bulk of the
    distinct instances: a handful of photos is too few). No handwritten digits: different
    digits of one class are copies of each other under the augmentations (a 10 degree turn, a
    60% crop), so asking the model to separate them fights the invariance it must learn."""
    rng = np.random.default_rng(seed)
    photos: list[Image.Image] = []
    for name, n_crops in TRAIN_SKIMAGE.items():
        photos += _crops(Image.open(skimage_data_dir() / name).convert("RGB"), n_crops, rng)
    faces = lfw_images(LFW_TRAIN_FACES)
    synthetic = [synthetic_image(rng) for _ in range(300)]
    parts = photos + faces + synthetic
    return {"photos": photos, "faces": faces, "synthetic": synthetic,
            "collages": [collage(parts, rng) for _ in range(n_collages)]}


class CopyPairs(IterableDataset):
    """Endless batches of (view a, view b): two copy augmentations of ``batch_size`` distinct
    images; each DataLoader worker draws from its own seeded generator.

    A fraction ``same_domain`` of the batches come from a single domain (all digits, all faces):
    mixed batches are separated by domain cues alone, and the detector then maps every MNIST
    "1" to one point; same-domain batches make it tell instances of a domain apart.
    """

    def __init__(self, domains: dict[str, Sequence[Image.Image]], batch_size: int,
                 img_size: int, seed: int, same_domain: float = 0.5) -> None:
        self.domains = {k: list(v) for k, v in domains.items() if v}
        self.images = [img for v in self.domains.values() for img in v]
        self.batch_size, self.img_size, self.seed = batch_size, img_size, seed
        self.same_domain = same_domain

    def _batch(self, rng: np.random.Generator) -> list[Image.Image]:
        if rng.random() < self.same_domain:
            names = list(self.domains)
            sizes = np.array([len(self.domains[k]) for k in names], dtype=np.float64)
            pool = self.domains[names[rng.choice(len(names), p=sizes / sizes.sum())]]
        else:
            pool = self.images
        n = min(self.batch_size, len(pool))
        return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            batch = self._batch(rng)
            views = [torch.stack([preprocess(copy_augment(img, rng), self.img_size, MEAN, STD)
                                  for img in batch]) for _ in range(2)]
            yield views[0], views[1]


def descriptor(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """cls + mean patch token, each L2-normalised, concatenated and re-normalised: what the embed
    stage computes with ``features: cls_avgpool``."""
    z = torch.cat([F.normalize(out["x_norm_clstoken"], dim=-1),
                   F.normalize(out["x_norm_patchtokens"].mean(1), dim=-1)], -1)
    return F.normalize(z, dim=-1)


def margin_loss(za: torch.Tensor, zb: torch.Tensor, neg_margin: float, pos_margin: float
                ) -> torch.Tensor:
    """Squared hinges on absolute cosine similarities: pairs of views of one image below
    ``pos_margin`` and pairs of different images above ``neg_margin`` are penalised (summed per
    anchor). InfoNCE alone only ranks: at temperature 0.05 it stops pushing a negative once it is
    ~0.3 below the positive, which leaves unrelated images at cosine 0.6-0.7, right where
    dedup draws its line."""
    n = len(za)
    z = torch.cat([za, zb])
    sims = z @ z.T
    same = torch.eye(n, dtype=torch.bool, device=z.device).repeat(2, 2)
    neg = F.relu(sims[~same] - neg_margin).pow(2).sum() / (2 * n)
    pos = F.relu(pos_margin - (za * zb).sum(-1)).pow(2).mean()
    return neg + pos


def train_copy_backbone(domains: dict[str, Sequence[Image.Image]], out_dir: Path, steps: int = 2400,
                        batch_size: int = 128, img_size: int = 48, patch_size: int = 8,
                        embed_dim: int = 128, depth: int = 4, num_heads: int = 4,
                        lr: float = 2e-3, temperature: float = 0.05, koleo_weight: float = 1.0,
                        same_domain: float = 0.5, margin_weight: float = 5.0,
                        neg_margin: float = 0.3, pos_margin: float = 0.85,
                        init: Path | None = None,
                        seed: int = 0, workers: int = 1, max_seconds: float | None = None,
                        device: str | None = None, progress: bool = True) -> dict:
    """Train a copy-detection backbone on images grouped by domain and export it to ``out_dir``.
    Batches vary in size when a same-domain batch draws from a domain smaller than the batch."""
    from tqdm import tqdm

    from dinosys.export import save_native
    from dinosys.losses.koleo import koleo_loss
    from dinosys.models import create_backbone

    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # LayerScale off: with 1e-5 a 4-block model stays close to its patch embedding for the
    # whole (short) run and maps every digit-like image to nearly the same point.
    if init is not None:  # continue from an exported detector (its architecture wins)
        from dinosys.export import load

        model = load(init).train().to(dev)
        img_size = int(model.cfg.img_size)
    else:
        model = create_backbone("vit_tiny", img_size=img_size, patch_size=patch_size,
                                embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                layerscale_init=None).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    pairs = CopyPairs(domains, batch_size, img_size, seed, same_domain)
    loader = DataLoader(pairs, batch_size=None,
                        num_workers=workers, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None)
    start = time.time()
    losses, koleos = [], []
    bar = tqdm(total=steps, desc="copy detector", unit="step", disable=not progress)
    for step, (a, b) in enumerate(loader):
        if step >= steps:
            break
        z = descriptor(model(torch.cat([a, b]).to(dev)))
        za, zb = z.chunk(2)
        logits = za @ zb.T / temperature
        target = torch.arange(len(za), device=dev)
        nce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        kol = (koleo_loss(za) + koleo_loss(zb)) / 2
        loss = nce + koleo_weight * kol + margin_weight * margin_loss(za, zb, neg_margin,
                                                                       pos_margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        sched.step()
        losses.append(float(nce.detach()))
        koleos.append(float(kol.detach()))
        bar.update()
        bar.set_postfix(nce=f"{losses[-1]:.3f}", koleo=f"{koleos[-1]:.3f}")
        if max_seconds is not None and time.time() - start > max_seconds:
            break
    bar.close()
    model.eval().cpu()
    info = {"steps": len(losses), "first_loss": round(losses[0], 4),
            "last_loss": round(float(np.mean(losses[-20:])), 4),
            "last_koleo": round(float(np.mean(koleos[-20:])), 4),
            "seconds": round(time.time() - start, 1)}
    save_native(model, Path(out_dir), card={
        "purpose": "copy detection (curation dedup)",
        "objective": f"InfoNCE (t={temperature}) over copy augmentations + {koleo_weight} KoLeo"
                     f" + {margin_weight} x squared hinges (negatives > {neg_margin}, "
                     f"positives < {pos_margin})",
        "train_images": {k: len(v) for k, v in pairs.domains.items()},
        "batch_size": batch_size, "same_domain_batches": same_domain, "img_size": img_size,
        "command": "python -m curation.copy_train", **info})
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m curation.copy_train OUT [--steps N]``: train + export."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="train a small copy-detection backbone and export it")
    p.add_argument("out", help="export directory to write")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1, help="augmentation worker processes")
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--koleo-weight", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--same-domain", type=float, default=0.5, help="fraction of one-domain batches")
    p.add_argument("--margin-weight", type=float, default=5.0)
    p.add_argument("--init", type=Path, default=None, help="continue from this exported detector")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--img-size", type=int, default=48, help="training resolution (px)")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    # all cores for the model: the augmentation worker needs ~1/3 of a core (measured on 2
    # cores: 2.3 steps/s with 2 torch threads, 1.8 with 1)
    torch.set_num_threads(os.cpu_count() or 1)
    info = train_copy_backbone(training_images(args.seed), Path(args.out),
                               steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                               workers=args.workers, max_seconds=args.max_seconds,
                               koleo_weight=args.koleo_weight, temperature=args.temperature,
                               same_domain=args.same_domain, margin_weight=args.margin_weight,
                               init=args.init, lr=args.lr, img_size=args.img_size,
                               patch_size=args.patch_size, embed_dim=args.embed_dim,
                               depth=args.depth, num_heads=args.heads, device=args.device)
    print(json.dumps(info, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
