"""Data pipeline throughput per CPU core: decode + 2x224 + 8x98 multi-crop + iBOT masks + collate.

Runs dinosys's pipeline and a plain-Pillow reference (decode the full image, RandomResizedCrop as
crop-then-resize, ImageEnhance jitter, PIL HSV hue, ImageFilter.GaussianBlur, to-tensor per crop)
in the same single process with one torch thread, on real web-size JPEGs (500x375 and 1024x768,
quality 90) made from the photos shipped in scikit-learn and scikit-image. Throughput is images
per CPU-second of this process (one core), so other load on the machine distorts it little.
Prints a per-stage breakdown of where dinosys's time goes, and as the last line one JSON object.

    python tools/bench_data.py [--images 96] [--batch 32]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from collections import defaultdict

import numpy as np
import PIL
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dinosys.config import CropConfig, MaskConfig
from dinosys.data.augment import MultiCropAugmentation, random_resized_crop_box
from dinosys.data.collate import CropBuffers, assemble_ssl_batch, collate_ssl
from dinosys.data.masking import MaskGenerator

SIZES = ((500, 375), (1024, 768))


def shipped_photos() -> list[np.ndarray]:
    """Colour photos that ship inside the scikit-learn and scikit-image wheels."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photos.append(getattr(skdata, name)())
    return photos


def make_jpegs(size: tuple[int, int], photos: list[np.ndarray]) -> list[bytes]:
    """Each photo centre-cropped to the aspect of ``size``, resized, JPEG quality 90."""
    out = []
    for arr in photos:
        img = Image.fromarray(arr).convert("RGB")
        target = size[0] / size[1]
        w, h = img.size
        if w / h > target:
            cw = int(h * target)
            img = img.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
        else:
            ch = int(w / target)
            img = img.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
        buf = io.BytesIO()
        img.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------- plain Pillow


class PlainPillowMultiCrop:
    """The straightforward torchvision-like DINOv2 pipeline written with Pillow only."""

    def __init__(self, cfg: CropConfig) -> None:
        self.cfg = cfg
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def _crop(self, img: Image.Image, scale, size, blur_p, solarize_p, rng) -> torch.Tensor:
        cfg = self.cfg
        left, top, w, h = random_resized_crop_box(img.width, img.height, scale, rng)
        img = img.crop((left, top, left + w, top + h)).resize((size, size),
                                                              Image.Resampling.BICUBIC)
        if rng.random() < cfg.flip_p:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < cfg.color_jitter_p:
            ops = [
                lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4)),
                lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 1.4)),
                lambda im: ImageEnhance.Color(im).enhance(rng.uniform(0.8, 1.2)),
                lambda im: self._hue(im, rng.uniform(-cfg.hue, cfg.hue)),
            ]
            for i in rng.permutation(4):
                img = ops[i](img)
        if rng.random() < cfg.grayscale_p:
            img = img.convert("L").convert("RGB")
        if rng.random() < blur_p:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(*cfg.blur_sigma)))
        if solarize_p and rng.random() < solarize_p:
            img = ImageOps.solarize(img, 128)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
        return (x - self.mean) / self.std

    @staticmethod
    def _hue(img: Image.Image, factor: float) -> Image.Image:
        h, s, v = img.convert("HSV").split()
        arr = np.asarray(h).astype(np.int64)
        h = Image.fromarray(((arr + int(factor * 255)) % 256).astype(np.uint8), "L")
        return Image.merge("HSV", (h, s, v)).convert("RGB")

    def from_bytes(self, data: bytes, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        img = Image.open(io.BytesIO(data)).convert("RGB")
        g = tuple(cfg.global_scale)
        crops = [self._crop(img, g, cfg.global_size, cfg.blur_p_global1, 0.0, rng),
                 self._crop(img, g, cfg.global_size, cfg.blur_p_global2, cfg.solarize_p_global2,
                            rng)]
        crops += [self._crop(img, tuple(cfg.local_scale), cfg.local_size, cfg.blur_p_local, 0.0,
                             rng) for _ in range(cfg.n_local)]
        return {"global_crops": crops[:2], "local_crops": crops[2:]}


# --------------------------------------------------------------------------- measurement


class StageClock:
    """The ``lap`` hook of MultiCropAugmentation: CPU time per stage, summed over calls."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.last = time.process_time()

    def reset(self) -> None:
        self.last = time.process_time()

    def __call__(self, stage: str) -> None:
        now = time.process_time()
        self.totals[stage] += now - self.last
        self.last = now


def run_plain(plain: PlainPillowMultiCrop, jpegs: list[bytes], n_images: int, batch: int,
              mask_gen: MaskGenerator) -> float:
    """Images per CPU-second for the reference: multi-crop, then masks + stacking collate."""
    samples: list[dict] = []
    start = time.process_time()
    for i in range(n_images):
        samples.append(plain.from_bytes(jpegs[i % len(jpegs)], np.random.default_rng(i)))
        if len(samples) == batch or i == n_images - 1:
            collate_ssl(samples, mask_gen, np.random.default_rng(i))
            samples = []
    return n_images / (time.process_time() - start)


def run_dinosys(aug: MultiCropAugmentation, jpegs: list[bytes], n_images: int, batch: int,
                mask_gen: MaskGenerator, lap: StageClock | None = None) -> float:
    """Images per CPU-second for what SSLStream.make_batch does: crops rendered straight into
    the batch tensors (CropBuffers), then masks."""
    start = time.process_time()
    for first in range(0, n_images, batch):
        n = min(batch, n_images - first)
        buffers = CropBuffers(n, aug.cfg)
        for i in range(n):
            if lap:
                lap.reset()
            aug.from_bytes(jpegs[(first + i) % len(jpegs)], np.random.default_rng(first + i),
                           10**9, lap=lap, out=buffers.views(i))
        if lap:
            lap.reset()
        assemble_ssl_batch(buffers.global_crops, buffers.local_crops, [-1] * n, mask_gen,
                           np.random.default_rng(first))
        if lap:
            lap("masks + batch dict")
    return n_images / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="images per measurement")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = CropConfig()
    aug = MultiCropAugmentation(cfg)
    plain = PlainPillowMultiCrop(cfg)
    mask_gen = MaskGenerator(cfg.global_size // 14, MaskConfig())
    photos = shipped_photos()
    pillow = f"Pillow {PIL.__version__}" + (" (SIMD)" if "post" in PIL.__version__ else "")
    print(f"{pillow}, torch {torch.__version__}, {len(photos)} shipped photos, "
          f"{args.images} images x best of {args.repeats}, batch {args.batch}, 1 thread")
    rows, ours_all, base_all = [], [], []
    for size in SIZES:
        jpegs = make_jpegs(size, photos)
        ours, base = 0.0, 0.0
        for _ in range(args.repeats):  # alternate, so load changes hit both alike
            ours = max(ours, run_dinosys(aug, jpegs, args.images, args.batch, mask_gen))
            base = max(base, run_plain(plain, jpegs, args.images, args.batch, mask_gen))
        rows.append((f"{size[0]}x{size[1]}", ours, base))
        ours_all.append(ours)
        base_all.append(base)
        clock = StageClock()
        run_dinosys(aug, jpegs, args.images, args.batch, mask_gen, lap=clock)
        stages = clock.totals
        total = sum(stages.values())
        print(f"\nwhere dinosys's time goes, {size[0]}x{size[1]} "
              f"({1e3 * total / args.images:.2f} ms/image):")
        for name, sec in sorted(stages.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<28} {1e3 * sec / args.images:7.3f} ms/image {100 * sec / total:5.1f}%")
    print(f"\n{'JPEG size':<12}{'dinosys img/s/core':>20}{'plain Pillow':>15}{'ratio':>8}")
    for name, ours, base in rows:
        print(f"{name:<12}{ours:>20.1f}{base:>15.1f}{ours / base:>8.2f}")
    ours_g = math.exp(np.mean(np.log(ours_all)))
    base_g = math.exp(np.mean(np.log(base_all)))
    print(f"{'geo. mean':<12}{ours_g:>20.1f}{base_g:>15.1f}{ours_g / base_g:>8.2f}")
    print(json.dumps({"images_per_s_per_core": round(ours_g, 1),
                      "baseline_images_per_s_per_core": round(base_g, 1),
                      "ratio": round(ours_g / base_g, 2),
                      "by_size": {n: {"dinosys": round(o, 1), "plain_pillow": round(b, 1)}
                                  for n, o, b in rows},
                      "pillow": PIL.__version__}))


if __name__ == "__main__":
    main()
