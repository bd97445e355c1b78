"""DINOv2 multi-crop augmentation without torchvision: fast PIL/numpy, torchvision semantics.

Per image: 2 global crops (RandomResizedCrop scale (0.32, 1)) and ``n_local`` local crops (scale
(0.05, 0.32)), each flipped (p 0.5), colour-jittered (p 0.8, the four ops in random order),
greyscaled (p 0.2), Gaussian-blurred (kernel 9, sigma U(0.1, 2); p 1.0 / 0.1 / 0.5 for global 1 /
global 2 / locals: the paper's probabilities, not DINOv2 code's ``1 - p``) and, for global 2 only,
solarized (p 0.2), then normalised. All randomness comes from an explicit
``numpy.random.Generator``.

Speed: every crop parameter is drawn first, so the JPEG can be decoded at the smallest DCT scale
that still covers every crop (after a reduced decode the boxes snap to the reduced pixel grid:
RandomResizedCrop of the reduced image); each crop is a view of the decoded array resized by
torch's uint8 antialiased bicubic kernel (crop-then-resize like torchvision; Pillow's filter in
AVX2, ~3x faster than Pillow's resize here). Colour ops then run on planar float32 crops
(:mod:`dinosys.data.color`, torchvision tensor semantics); grey crops stay single-plane through
blur and solarize; the normalised result can be written straight into a batch tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinosys.config import ConfigError, Section, check_bounds, check_range
from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.data import color
from dinosys.data.decode import decode_array, probe_image

RATIO = (3.0 / 4.0, 4.0 / 3.0)
Lap = Callable[[str], None]  # stage-timing hook: called with a stage name when it ends
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
_JITTER_OPS = (color.adjust_brightness, color.adjust_contrast, color.adjust_saturation,
               color.adjust_hue)


@dataclass
class CropConfig(Section):
    """Multi-crop augmentation (2 global + n_local local crops)."""

    global_size: int = 224  # global crop side in pixels
    local_size: int = 98  # local crop side in pixels
    n_global: int = 2  # global crops per image
    n_local: int = 8  # local crops per image
    # area range of a global crop (random resized crop)
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    # area range of a local crop
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    flip_p: float = 0.5  # horizontal flip probability
    color_jitter_p: float = 0.8  # colour jitter probability
    brightness: float = 0.4  # colour jitter brightness strength
    contrast: float = 0.4  # colour jitter contrast strength
    saturation: float = 0.2  # colour jitter saturation strength
    hue: float = 0.1  # colour jitter hue strength
    grayscale_p: float = 0.2  # grey-scale probability
    blur_p_global1: float = 1.0  # Gaussian blur probability, first global crop
    blur_p_global2: float = 0.1  # Gaussian blur probability, second global crop
    blur_p_local: float = 0.5  # Gaussian blur probability, local crops
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # Gaussian blur sigma range
    solarize_p_global2: float = 0.2  # solarisation probability, second global crop
    # normalisation mean (RGB)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # normalisation std (RGB)

    def validate(self) -> None:
        for name in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p_global1",
                     "blur_p_global2", "blur_p_local", "solarize_p_global2"):
            check_range(getattr(self, name), f"crops.{name}", 0.0, 1.0)
        check_bounds(self, "crops", {
            "global_size": (1, None), "local_size": (1, None), "n_local": (0, None),
            "global_scale": (1e-6, 1), "local_scale": (1e-6, 1), "brightness": (0, None),
            "contrast": (0, None), "saturation": (0, None), "hue": (0, 0.5),
            "blur_sigma": (0, None), "std": (1e-8, None)})
        if self.n_global != 2:
            raise ConfigError("config key 'crops.n_global': DINOv2 uses exactly 2 global crops")


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


def color_jitter(x: np.ndarray, order: tuple[int, ...],
                 factors: tuple[float, float, float, float]) -> np.ndarray:
    """torchvision ColorJitter on a planar float (3, H, W) image, the four ops in ``order``."""
    for op in order:
        x = _JITTER_OPS[op](x, factors[op])
    return x


class MultiCropAugmentation:
    """DINOv2 multi-crop: ``aug(img, rng)`` -> {"global_crops": [2 crops], "local_crops": [...]}.

    ``__call__`` returns normalised float tensors; :meth:`crops_uint8` and :meth:`from_bytes`
    return uint8 HxWx3 arrays for the batched to-tensor in collate (the fast path).
    """

    def __init__(self, cfg: CropConfig) -> None:
        self.cfg = cfg
        self.mean = [255.0 * float(m) for m in cfg.mean]  # on the [0, 255] scale
        self.inv_std = [1.0 / (255.0 * float(sd)) for sd in cfg.std]

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
    def geometric_crop(src: torch.Tensor, p: CropParams, sx: float, sy: float,
                       out: np.ndarray | None = None) -> np.ndarray:
        """Cut, resize and flip one crop of ``src`` (uint8 (1, 3, H, W) channels-last view):
        uint8 (3, size, size), copied into ``out`` when given. ``sx, sy`` scale the box to a
        reduced decode. The photometric ops of ``p`` are not applied."""
        h, w = src.shape[-2:]
        left, top = min(int(round(p.box[0] * sx)), w - 1), min(int(round(p.box[1] * sy)), h - 1)
        right = max(left + 1, min(w, int(round(p.box[2] * sx))))
        bottom = max(top + 1, min(h, int(round(p.box[3] * sy))))
        crop = F.interpolate(src[:, :, top:bottom, left:right], size=(p.size, p.size),
                             mode="bicubic", antialias=True, align_corners=False)[0].numpy()
        if p.flip:
            crop = crop[:, :, ::-1]
        if out is None:
            return crop
        np.copyto(out, crop)
        return out

    def render_crop(self, src: torch.Tensor, p: CropParams, sx: float, sy: float,
                    lap: Lap | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Cut, resize, colour and normalise one crop of ``src`` (uint8 (1, 3, H, W) channels-last
        view); ``sx, sy`` scale the box to a reduced decode. Returns float32 (3, size, size),
        written into ``out`` when given (a slot of a batch buffer: no collate copy).
        ``lap(stage)`` (benchmarks) is called at the end of each stage."""
        x = self.geometric_crop(src, p, sx, sy).astype(np.float32)  # [0, 255]: see color
        if lap:
            lap("crop + resize + to float")
        if p.jitter_order is not None:
            x = color_jitter(x, p.jitter_order, p.factors)
            if lap:
                lap("colour jitter")
        if p.gray:
            x = color.to_gray(x)
        if p.blur_sigma is not None:
            x = color.gaussian_blur(x, p.blur_sigma)
            if lap:
                lap("blur")
        if p.solarize:
            x = color.solarize(x)
        if out is None:
            out = np.empty((3, p.size, p.size), dtype=np.float32)
        for c in range(3):  # (x - mean) / std, one plane at a time; a grey plane broadcasts
            plane = x if x.ndim == 2 else x[c]
            np.subtract(plane, self.mean[c], out=out[c])
            out[c] *= self.inv_std[c]
        if lap:
            lap("grey + solarize + normalise")
        return out

    def crops(self, img: Image.Image | np.ndarray, rng: np.random.Generator
              ) -> dict[str, list[np.ndarray]]:
        """Multi-crop of a decoded image (PIL or uint8 HxWx3): normalised float32 (3, H, W)."""
        if isinstance(img, Image.Image):
            img = np.array(img.convert("RGB"), dtype=np.uint8)
        params = self.sample_params(img.shape[1], img.shape[0], rng)
        return self._render(img, params, 1.0, 1.0)

    def _render(self, arr: np.ndarray, params: list[CropParams], sx: float, sy: float,
                lap: Lap | None = None, out: dict[str, list[np.ndarray]] | None = None
                ) -> dict[str, list[np.ndarray]]:
        if not arr.flags.writeable:
            arr = arr.copy()
        src = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # channels-last view
        slots = [None] * len(params) if out is None else out["global_crops"] + out["local_crops"]
        crops = [self.render_crop(src, p, sx, sy, lap, slot) for p, slot in zip(params, slots)]
        n_global = len(params) - self.cfg.n_local
        return {"global_crops": crops[:n_global], "local_crops": crops[n_global:]}

    def from_bytes(self, data: bytes, rng: np.random.Generator, max_pixels: int,
                   decoder: str = "auto", lap: Lap | None = None,
                   out: dict[str, list[np.ndarray]] | None = None) -> dict[str, list[np.ndarray]]:
        """Decode at the smallest sufficient scale, then multi-crop (raises BadImageError).

        ``out``: destination arrays {"global_crops": [...], "local_crops": [...]} to write the
        crops into (see :class:`dinosys.data.collate.CropBuffers`)."""
        arr, params, sx, sy = self._decode_for_crops(data, rng, max_pixels, decoder, lap)
        return self._render(arr, params, sx, sy, lap, out)

    def _decode_for_crops(self, data: bytes, rng: np.random.Generator, max_pixels: int,
                          decoder: str, lap: Lap | None
                          ) -> tuple[np.ndarray, list[CropParams], float, float]:
        header = probe_image(data, max_pixels)
        params = self.sample_params(header.width, header.height, rng)
        need = self.min_source_size(params, header.width, header.height)
        if lap:
            lap("probe + crop params")
        arr = decode_array(data, max_pixels, draft_size=need, decoder=decoder, header=header)
        if lap:
            lap("decode (reduced scale)")
        return arr, params, arr.shape[1] / header.width, arr.shape[0] / header.height

    def geometric_from_bytes(self, data: bytes, rng: np.random.Generator, max_pixels: int,
                             decoder: str = "auto", lap: Lap | None = None,
                             out: dict[str, list[np.ndarray]] | None = None
                             ) -> tuple[dict[str, list[np.ndarray]], list[CropParams]]:
        """The ``data.gpu_augment`` half of :meth:`from_bytes`: the same random draws, decode,
        crop, resize and flip, but no colour op, blur, solarize or normalisation.

        Returns uint8 (3, size, size) crops (written into ``out``'s uint8 slots when given) and
        every crop's parameters, global crops first; :mod:`dinosys.data.gpu_augment` applies
        the photometric part of those parameters to the batch on the training device."""
        arr, params, sx, sy = self._decode_for_crops(data, rng, max_pixels, decoder, lap)
        if not arr.flags.writeable:
            arr = arr.copy()
        src = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # channels-last view
        slots = [None] * len(params) if out is None else out["global_crops"] + out["local_crops"]
        crops = [self.geometric_crop(src, p, sx, sy, slot) for p, slot in zip(params, slots)]
        if lap:
            lap("crop + resize (uint8)")
        n_global = len(params) - self.cfg.n_local
        return {"global_crops": crops[:n_global], "local_crops": crops[n_global:]}, params

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> dict[str, list[torch.Tensor]]:
        """Multi-crop of a PIL image into normalised float tensors (C, H, W)."""
        out = self.crops(img, rng)
        return {k: [torch.from_numpy(c) for c in v] for k, v in out.items()}
