"""DINOv2 multi-crop augmentation without torchvision: fast PIL/numpy, torchvision semantics.

Per image: 2 global crops (RandomResizedCrop scale (0.32, 1)) and ``n_local`` local crops (scale
(0.05, 0.32)), each flipped (p 0.5), colour-jittered (p 0.8, the four ops in random order),
greyscaled (p 0.2), Gaussian-blurred (kernel 9, sigma U(0.1, 2); p 1.0 / 0.1 / 0.5 for global 1 /
global 2 / locals: the paper's probabilities, not DINOv2 code's ``1 - p``) and, for global 2 only,
solarized (p 0.2). All randomness comes from an explicit ``numpy.random.Generator``.

Speed: every crop parameter is drawn first, so the JPEG can be decoded at the smallest DCT scale
that still covers every crop, and each crop is cut and resized in one ``resize(box=...)`` call.
Brightness and contrast are 256-entry lookup tables fused into one ``Image.point``; grey crops
stay single-channel through blur and solarize; crops stay uint8 until a batched to-tensor in
:func:`dinosys.data.collate.collate_ssl`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from dinosys.config import CropConfig
from dinosys.data.decode import decode_image, probe_image

BLUR_KERNEL_SIZE = 9
RATIO = (3.0 / 4.0, 4.0 / 3.0)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
_IDENTITY = np.arange(256, dtype=np.float64)
_SOLARIZE_LUT = np.where(_IDENTITY < 128, _IDENTITY, 255 - _IDENTITY).astype(np.uint8)


@dataclass
class CropParams:
    """Everything random about one crop, drawn before any pixel is touched."""

    box: tuple[float, float, float, float]  # (left, top, right, bottom) in displayed pixels
    size: int
    flip: bool
    jitter_order: tuple[int, ...] | None  # None: no colour jitter
    factors: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    gray: bool
    blur_sigma: float | None
    solarize: bool


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            rng: np.random.Generator, ratio: tuple[float, float] = RATIO
                            ) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (left, top, w, h), central-crop fallback."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def gaussian_kernel(sigma: float, size: int = BLUR_KERNEL_SIZE) -> np.ndarray:
    """The normalised 1-D Gaussian torchvision's GaussianBlur(kernel_size=size) uses."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Separable 9-tap Gaussian with reflect padding on a uint8 HxW(xC) array, rounded to uint8."""
    k = gaussian_kernel(sigma)
    tmp = ndimage.correlate1d(arr, k, axis=0, mode="mirror", output=np.float32)
    out = ndimage.correlate1d(tmp, k, axis=1, mode="mirror", output=np.float32)
    return np.clip(np.rint(out, out=out), 0, 255, out=out).astype(np.uint8)


def _blend_lut(lut: np.ndarray, anchor: float, factor: float) -> np.ndarray:
    # PIL Image.blend(degenerate, img, f) = int(anchor + f * (v - anchor)), clipped.
    return anchor + factor * (lut - anchor)


def color_jitter(img: Image.Image, order: tuple[int, ...],
                 factors: tuple[float, float, float, float]) -> Image.Image:
    """torchvision ColorJitter on a PIL RGB image (PIL-backend semantics), ops in ``order``."""
    lut: np.ndarray | None = None  # pending brightness/contrast table, applied lazily
    hist: np.ndarray | None = None

    def flush(im: Image.Image) -> Image.Image:
        nonlocal lut, hist
        if lut is not None:
            table = np.clip(np.trunc(lut), 0, 255).astype(np.uint8)
            im = im.point(np.tile(table, 3).tolist())
        lut, hist = None, None
        return im

    for op in order:
        f = factors[op]
        if op == BRIGHTNESS:
            lut = _blend_lut(_IDENTITY if lut is None else lut, 0.0, f)
        elif op == CONTRAST:
            if hist is None:
                hist = np.asarray(img.histogram(), dtype=np.float64).reshape(3, 256)
            cur = _IDENTITY if lut is None else np.clip(np.trunc(lut), 0, 255)
            channel_means = hist @ cur / hist[0].sum()
            mean = int(0.299 * channel_means[0] + 0.587 * channel_means[1]
                       + 0.114 * channel_means[2] + 0.5)
            lut = _blend_lut(cur, float(mean), f)
        elif op == SATURATION:
            img = flush(img)
            img = Image.blend(img.convert("L").convert("RGB"), img, f)
        else:
            img = flush(img)
            if f != 0.0:
                h, s, v = img.convert("HSV").split()
                shift = int(np.uint8(np.int64(f * 255) % 256))
                h = h.point([(i + shift) % 256 for i in range(256)])
                img = Image.merge("HSV", (h, s, v)).convert("RGB")
    return flush(img)


class MultiCropAugmentation:
    """DINOv2 multi-crop: ``aug(img, rng)`` -> {"global_crops": [2 crops], "local_crops": [...]}.

    ``__call__`` returns normalised float tensors; :meth:`crops_uint8` and :meth:`from_bytes`
    return uint8 HxWx3 arrays for the batched to-tensor in collate (the fast path).
    """

    def __init__(self, cfg: CropConfig) -> None:
        self.cfg = cfg
        self.mean = np.asarray(cfg.mean, dtype=np.float32)
        self.std = np.asarray(cfg.std, dtype=np.float32)

    # ----------------------------------------------------------------- parameters
    def _crop_params(self, width: int, height: int, scale: tuple[float, float], size: int,
                     blur_p: float, solarize_p: float, rng: np.random.Generator) -> CropParams:
        cfg = self.cfg
        left, top, w, h = random_resized_crop_box(width, height, scale, rng)
        flip = bool(rng.random() < cfg.flip_p)
        order: tuple[int, ...] | None = None
        factors = (1.0, 1.0, 1.0, 0.0)
        if rng.random() < cfg.color_jitter_p:
            order = tuple(int(i) for i in rng.permutation(4))
            b = rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)
            c = rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)
            s = rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)
            hue = rng.uniform(-cfg.hue, cfg.hue)
            factors = (float(b), float(c), float(s), float(hue))
        gray = bool(rng.random() < cfg.grayscale_p)
        blur = bool(rng.random() < blur_p)
        sigma = float(rng.uniform(*cfg.blur_sigma)) if blur else None
        solarize = bool(solarize_p > 0 and rng.random() < solarize_p)
        return CropParams((left, top, left + w, top + h), size, flip, order, factors, gray,
                          sigma, solarize)

    def sample_params(self, width: int, height: int, rng: np.random.Generator) -> list[CropParams]:
        """All crops' parameters for an image of displayed size (width, height)."""
        cfg = self.cfg
        g_scale, l_scale = tuple(cfg.global_scale), tuple(cfg.local_scale)
        params = [
            self._crop_params(width, height, g_scale, cfg.global_size, cfg.blur_p_global1, 0.0,
                              rng),
            self._crop_params(width, height, g_scale, cfg.global_size, cfg.blur_p_global2,
                              cfg.solarize_p_global2, rng),
        ]
        for _ in range(cfg.n_local):
            params.append(self._crop_params(width, height, l_scale, cfg.local_size,
                                            cfg.blur_p_local, 0.0, rng))
        return params

    @staticmethod
    def min_source_size(params: list[CropParams], width: int, height: int) -> tuple[int, int]:
        """The smallest displayed image size at which every crop box still covers its output."""
        fx = max(p.size / (p.box[2] - p.box[0]) for p in params)
        fy = max(p.size / (p.box[3] - p.box[1]) for p in params)
        f = min(1.0, max(fx, fy))
        return int(math.ceil(width * f)), int(math.ceil(height * f))

    # ----------------------------------------------------------------- pixels
    @staticmethod
    def render_crop(img: Image.Image, p: CropParams, sx: float, sy: float) -> np.ndarray:
        """Cut, resize and colour one crop; returns uint8 (size, size, 3)."""
        box = (p.box[0] * sx, p.box[1] * sy, p.box[2] * sx, p.box[3] * sy)
        crop = img.resize((p.size, p.size), Image.Resampling.BICUBIC, box=box)
        if p.flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if p.jitter_order is not None:
            crop = color_jitter(crop, p.jitter_order, p.factors)
        if p.gray:
            crop = crop.convert("L")
        arr = np.asarray(crop)
        if p.blur_sigma is not None:
            arr = gaussian_blur(arr, p.blur_sigma)
        if p.solarize:
            arr = _SOLARIZE_LUT[arr]
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return arr

    def crops_uint8(self, img: Image.Image, rng: np.random.Generator
                    ) -> dict[str, list[np.ndarray]]:
        """Multi-crop of a decoded RGB image; crops as uint8 HxWx3 arrays."""
        img = img if img.mode == "RGB" else img.convert("RGB")
        params = self.sample_params(img.width, img.height, rng)
        return self._render(img, params, 1.0, 1.0)

    def _render(self, img: Image.Image, params: list[CropParams], sx: float, sy: float
                ) -> dict[str, list[np.ndarray]]:
        crops = [self.render_crop(img, p, sx, sy) for p in params]
        return {"global_crops": crops[:2], "local_crops": crops[2:]}

    def from_bytes(self, data: bytes, rng: np.random.Generator, max_pixels: int,
                   decoder: str = "auto") -> dict[str, list[np.ndarray]]:
        """Decode at the smallest sufficient scale, then multi-crop (raises BadImageError)."""
        header = probe_image(data, max_pixels)
        params = self.sample_params(header.width, header.height, rng)
        need = self.min_source_size(params, header.width, header.height)
        img = decode_image(data, max_pixels, draft_size=need, decoder=decoder, header=header)
        sx, sy = img.width / header.width, img.height / header.height
        return self._render(img, params, sx, sy)

    def normalize(self, crops: list[np.ndarray]) -> list[torch.Tensor]:
        """uint8 HxWx3 arrays -> normalised float (3,H,W) tensors."""
        return [to_normalized_tensor(np.stack([c]), self.cfg.mean, self.cfg.std)[0] for c in crops]

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> dict[str, list[torch.Tensor]]:
        """Multi-crop of a PIL image into normalised float tensors (C, H, W)."""
        out = self.crops_uint8(img, rng)
        return {k: self.normalize(v) for k, v in out.items()}


def to_normalized_tensor(batch: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float32 (N,3,H,W), (x/255 - mean) / std, in one pass per op."""
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32,
                                                       memory_format=torch.contiguous_format)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
    return x.sub_(m).mul_(s)
