"""Data pipeline throughput per CPU core: decode + 2x224 + 8x98 multi-crop + iBOT masks + collate.

Runs dinosys's pipeline and a plain-Pillow reference (decode the full image, RandomResizedCrop as
crop-then-resize, ImageEnhance jitter, PIL HSV hue, ImageFilter.GaussianBlur, to-tensor per crop)
in the same single process with one torch thread, on real web-size JPEGs (500x375 and 1024x768,
quality 90) made from the photos shipped in scikit-learn and scikit-image. Throughput is images
per CPU-second of this process (one core), so other load on the machine distorts it little.
Prints a per-stage breakdown of where dinosys's time goes, and as the last line one JSON object.

``--gpu-augment`` instead measures the CPU side of ``data.gpu_augment`` (decode, crop, resize,
flip into uint8 batch tensors, photometric parameters, masks) against the full CPU pipeline, and
times the photometric step (:func:`dinosys.data.gpu_augment.apply_photometric`, from pinned
uint8 crops) on CUDA when present, and with torch on this CPU for comparison.

    python tools/bench_data.py [--images 96] [--batch 32] [--gpu-augment]
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

from dinosys.data.augment import CropConfig, MultiCropAugmentation, random_resized_crop_box
from dinosys.data.collate import CropBuffers, assemble_ssl_batch, collate_ssl
from dinosys.data.gpu_augment import PARAMS_KEY, PhotometricParams, apply_photometric
from dinosys.data.masking import MaskConfig, MaskGenerator

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


def run_geometric(aug: MultiCropAugmentation, jpegs: list[bytes], n_images: int, batch: int,
                  mask_gen: MaskGenerator, lap: StageClock | None = None,
                  keep: list[dict] | None = None) -> float:
    """Images per CPU-second for the CPU side of ``data.gpu_augment`` (what SSLStream.make_batch
    does then): uint8 geometric crops into the batch tensors, photometric parameters, masks."""
    start = time.process_time()
    for first in range(0, n_images, batch):
        n = min(batch, n_images - first)
        buffers = CropBuffers(n, aug.cfg, dtype=torch.uint8)
        params = PhotometricParams(n, aug.cfg)
        for i in range(n):
            if lap:
                lap.reset()
            _, crop_params = aug.geometric_from_bytes(
                jpegs[(first + i) % len(jpegs)], np.random.default_rng(first + i), 10**9,
                lap=lap, out=buffers.views(i))
            params.set_sample(i, crop_params)
        if lap:
            lap.reset()
        out = assemble_ssl_batch(buffers.global_crops, buffers.local_crops, [-1] * n, mask_gen,
                                 np.random.default_rng(first))
        out[PARAMS_KEY] = params.as_dict()
        if lap:
            lap("parameters + masks + batch dict")
        if keep is not None:
            keep.append(out)
    return n_images / (time.process_time() - start)


def time_photometric(batch: dict, device: str, repeats: int) -> float:
    """Best wall seconds of ``apply_photometric`` on ``device`` for one batch (crops pinned
    first on CUDA, as the DataLoader's pin_memory does)."""
    if device == "cuda":
        batch = {**batch, **{k: batch[k].pin_memory() for k in ("global_crops", "local_crops")}}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    apply_photometric(batch, device)  # warm-up (kernels, allocator)
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        apply_photometric(batch, device)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main_gpu_augment(args: argparse.Namespace, cfg: CropConfig, aug: MultiCropAugmentation,
                     mask_gen: MaskGenerator, photos: list[np.ndarray]) -> None:
    """``--gpu-augment``: the CPU side of data.gpu_augment vs the full CPU pipeline."""
    cuda = torch.cuda.is_available()
    rows, full_all, geo_all, by_size = [], [], [], {}
    for size in SIZES:
        name = f"{size[0]}x{size[1]}"
        jpegs = make_jpegs(size, photos)
        full, geo = 0.0, 0.0
        for _ in range(args.repeats):  # alternate, so load changes hit both alike
            full = max(full, run_dinosys(aug, jpegs, args.images, args.batch, mask_gen))
            geo = max(geo, run_geometric(aug, jpegs, args.images, args.batch, mask_gen))
        clock, kept = StageClock(), []
        run_geometric(aug, jpegs, args.images, args.batch, mask_gen, lap=clock, keep=kept)
        total = sum(clock.totals.values())
        print(f"\nwhere the CPU side of gpu_augment spends its time, {name} "
              f"({1e3 * total / args.images:.2f} ms/image):")
        for stage, sec in sorted(clock.totals.items(), key=lambda kv: -kv[1]):
            print(f"  {stage:<31} {1e3 * sec / args.images:7.3f} ms/image "
                  f"{100 * sec / total:5.1f}%")
        first = kept[0]
        n_first = int(first["batch_size"])
        few = min(8, n_first)  # torch on one CPU thread is slow: time a few images
        small = {**first, PARAMS_KEY: {**first[PARAMS_KEY]}}
        for key in ("global_crops", "local_crops"):
            rows_of = torch.arange(first[key].shape[0]) % n_first < few
            small[key] = first[key][rows_of]
            small[PARAMS_KEY][key] = {k: v[rows_of] for k, v in first[PARAMS_KEY][key].items()}
        cpu_ms = 1e3 * time_photometric(small, "cpu", 1) / few
        cuda_ms = 1e3 * time_photometric(first, "cuda", 10) / n_first if cuda else None
        rows.append((name, full, geo, cpu_ms, cuda_ms))
        full_all.append(full)
        geo_all.append(geo)
        by_size[name] = {"full_cpu": round(full, 1), "cpu_side": round(geo, 1),
                         "photometric_torch_cpu_ms_per_image": round(cpu_ms, 2),
                         "photometric_cuda_ms_per_image": (round(cuda_ms, 4) if cuda_ms
                                                           else None)}
    print(f"\n{'JPEG size':<12}{'full CPU img/s/core':>20}{'CPU side of gpu_augment':>25}"
          f"{'ratio':>7}{'torch CPU ms/img':>18}{'CUDA ms/img':>13}")
    for name, full, geo, cpu_ms, cuda_ms in rows:
        gpu_txt = f"{cuda_ms:.4f}" if cuda_ms is not None else "no CUDA"
        print(f"{name:<12}{full:>20.1f}{geo:>25.1f}{geo / full:>7.2f}{cpu_ms:>18.1f}"
              f"{gpu_txt:>13}")
    full_g = math.exp(np.mean(np.log(full_all)))
    geo_g = math.exp(np.mean(np.log(geo_all)))
    print(f"{'geo. mean':<12}{full_g:>20.1f}{geo_g:>25.1f}{geo_g / full_g:>7.2f}")
    print(json.dumps({"mode": "gpu_augment",
                      "cpu_side_images_per_s_per_core": round(geo_g, 1),
                      "full_cpu_images_per_s_per_core": round(full_g, 1),
                      "ratio": round(geo_g / full_g, 2), "cuda": cuda,
                      "cuda_device": torch.cuda.get_device_name() if cuda else None,
                      "by_size": by_size, "pillow": PIL.__version__}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="images per measurement")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs")
    parser.add_argument("--gpu-augment", action="store_true",
                        help="measure the CPU side of data.gpu_augment (photometric ops moved "
                             "to the training device) against the full CPU pipeline")
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
    if args.gpu_augment:
        main_gpu_augment(args, cfg, aug, mask_gen, photos)
        return
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
