"""The photometric half of the DINOv2 augmentation as batched torch ops (``data.gpu_augment``).

With ``data.gpu_augment: true`` the loader's CPU workers do only decode, random-resized-crop and
flip (:meth:`MultiCropAugmentation.geometric_from_bytes`): the batch carries uint8 crops
(N, 3, H, W) and, under ``batch["photometric"]``, every crop's colour-jitter factors and order,
greyscale flag, blur sigma and solarize flag, drawn from the same per-sample seeded RNG as the
CPU path. :class:`PhotometricAugment` then applies colour jitter (per-sample factors and op
order), greyscale, Gaussian blur (kernel 9, per-sample sigma), solarize and normalisation on
whatever device the crops are on; the trainer calls :func:`apply_photometric` right after the
batch reaches its device, so consumers still get normalised float crops.

Every op is a port of :mod:`dinosys.data.color` (torchvision tensor semantics on the [0, 255]
scale) that performs the same float32 operations in the same order, vectorised over the batch.
The elementwise ops and the blur therefore give bit-identical results for identical input. Grey
levels differ by an ulp (the CPU path's OpenBLAS gemv changes kernels with the image size), and
the contrast op's image mean is a float32 reduction: numpy's is off by up to ~1e-2 levels on a
224x224 crop of non-integer values, torch's by ~2e-5. Whole pipelines agree to 1e-2 of a uint8
level; solarize is a threshold, so a value that close to 128 can land on the other side (see
tests/data/test_gpu_augment.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dinosys.data.augment import CropConfig
from dinosys.data.augment import BRIGHTNESS, CONTRAST, HUE, SATURATION, CropParams
from dinosys.data.color import BLUR_KERNEL_SIZE, GRAY_WEIGHTS, MAX_VALUE

PARAMS_KEY = "photometric"
CROP_KEYS = ("global_crops", "local_crops")
SOLARIZE_THRESHOLD = 128.0  # on the [0, 255] scale: 128/255, Pillow's ImageOps.solarize(128)


# --------------------------------------------------------------------------- parameters


class PhotometricParams:
    """Per-crop photometric parameters of one batch, filled per sample by the loader workers.

    Rows are crop-major like the batch tensors: row ``c * batch_size + i`` is crop ``c`` of
    sample ``i``. Filled in numpy (cheap per-item writes), handed over as tensors by
    :meth:`as_dict`.
    """

    def __init__(self, batch_size: int, cfg: CropConfig) -> None:
        self.batch_size, self.n_global = batch_size, cfg.n_global
        self.mean = np.asarray(cfg.mean, dtype=np.float64)
        self.std = np.asarray(cfg.std, dtype=np.float64)
        self.rows = {"global_crops": self._empty(cfg.n_global * batch_size),
                     "local_crops": self._empty(cfg.n_local * batch_size)}

    @staticmethod
    def _empty(n: int) -> dict[str, np.ndarray]:
        return {"jitter": np.zeros(n, dtype=bool),
                "order": np.tile(np.arange(4, dtype=np.int64), (n, 1)),
                "factors": np.tile(np.asarray([1.0, 1.0, 1.0, 0.0]), (n, 1)),
                "gray": np.zeros(n, dtype=bool),
                "blur": np.zeros(n, dtype=bool),
                "blur_sigma": np.ones(n, dtype=np.float64),
                "solarize": np.zeros(n, dtype=bool)}

    def set_sample(self, i: int, params: Sequence[CropParams]) -> None:
        """Record sample ``i``'s crops (global crops first, as ``sample_params`` returns them)."""
        for c, p in enumerate(params):
            key = "global_crops" if c < self.n_global else "local_crops"
            rows = self.rows[key]
            r = (c if c < self.n_global else c - self.n_global) * self.batch_size + i
            if p.jitter_order is not None:
                rows["jitter"][r] = True
                rows["order"][r] = p.jitter_order
                rows["factors"][r] = p.factors
            rows["gray"][r] = p.gray
            if p.blur_sigma is not None:
                rows["blur"][r] = True
                rows["blur_sigma"][r] = p.blur_sigma
            rows["solarize"][r] = p.solarize

    def as_dict(self) -> dict[str, Any]:
        """``batch["photometric"]``: per crop key a dict of tensors, plus "mean" and "std"."""
        out: dict[str, Any] = {key: {name: torch.from_numpy(arr) for name, arr in rows.items()}
                               for key, rows in self.rows.items()}
        out["mean"] = torch.from_numpy(self.mean.copy())
        out["std"] = torch.from_numpy(self.std.copy())
        return out


# --------------------------------------------------------------------------- batched ops
# x: float32 (N, 3, H, W) on the [0, 255] scale; factors: (N,) tensors (float64 like the CPU
# path's python floats; each op casts them the way numpy does).


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    return v.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)


def _weak(v: Tensor, x: Tensor) -> Tensor:
    """A float64 value used where numpy computes in python floats, cast to float32 last."""
    return v.to(device=x.device, dtype=torch.float64).to(torch.float32).view(-1, 1, 1, 1)


def to_gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma with torchvision's weights.

    Fused multiply-adds, like the BLAS gemv of the CPU path (so the two agree bit for bit)."""
    w = torch.as_tensor(GRAY_WEIGHTS, device=x.device)
    gray = torch.addcmul(x[:, 0:1] * w[0], x[:, 1:2], w[1])
    return torch.addcmul(gray, x[:, 2:3], w[2])


def _blend(x: Tensor, other_scaled: Tensor, factor: Tensor) -> Tensor:
    """clamp(factor * x + [(1 - factor) * other]) with the second term already computed."""
    out = x * _per_sample(factor, x)
    out += other_scaled
    return out.clamp_(0.0, MAX_VALUE)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Multiply by the per-sample ``factor`` (N,), clamp."""
    return (x * _per_sample(factor, x)).clamp_(max=MAX_VALUE)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its mean grey level."""
    w = torch.as_tensor(GRAY_WEIGHTS, device=x.device)
    mean = (x.mean(dim=(2, 3)) * w).sum(dim=1)  # float32, like numpy's weights @ channel means
    f = factor.to(device=x.device, dtype=torch.float64)
    return _blend(x, _weak((1.0 - f) * mean.double(), x), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its per-pixel grey image."""
    f = factor.to(device=x.device, dtype=torch.float64)
    return _blend(x, _weak(1.0 - f, x) * to_gray(x), factor)


def adjust_hue(x: Tensor, hue_factor: Tensor) -> Tensor:
    """Rotate the HSV hue by ``hue_factor`` (N,) turns: :func:`dinosys.data.color.adjust_hue`."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    hi = torch.maximum(torch.maximum(r, g), b)
    lo = torch.minimum(torch.minimum(r, g), b)
    chroma = hi - lo
    inv = torch.where(chroma > 0, 1.0 / chroma, torch.zeros_like(chroma))
    h_b = (r - g) * inv + 4.0
    h_g = (b - r) * inv + 2.0
    h_r = (g - b) * inv
    h = torch.where(hi == r, h_r, torch.where(hi == g, h_g, h_b))
    h += _weak(6.0 * hue_factor.to(device=x.device, dtype=torch.float64), x).view(-1, 1, 1)
    h -= torch.floor(h * (1.0 / 6.0)) * 6.0  # wrap to [0, 6)
    out = torch.empty_like(x)
    for c, centre in ((0, 3.0), (1, 2.0), (2, 4.0)):
        t = (h - centre).abs_()
        t = t - 1.0 if c == 0 else 2.0 - t
        out[:, c] = t.clamp_(0.0, 1.0).mul_(chroma).add_(lo)
    return out


def gaussian_kernels(sigma: Tensor, size: int = BLUR_KERNEL_SIZE) -> Tensor:
    """(N,) sigmas -> (N, size) normalised 1-D Gaussians (computed in float64, then float32)."""
    t = torch.arange(size, dtype=torch.float64, device=sigma.device) - (size - 1) / 2
    k = torch.exp(-0.5 * (t / sigma.to(torch.float64).view(-1, 1)) ** 2)
    return (k / k.sum(dim=1, keepdim=True)).to(torch.float32)


def gaussian_blur(x: Tensor, sigma: Tensor, size: int = BLUR_KERNEL_SIZE) -> Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` (N,), "reflect" padding.

    Written as shifted multiply-adds (pairs of symmetric taps first), the same float32
    arithmetic as :func:`dinosys.data.color.gaussian_blur`, so results are bit-identical."""
    r = size // 2
    h, w = x.shape[-2:]
    if min(h, w) <= r:
        raise ValueError(f"image {(h, w)} too small for a {size}-tap blur")
    k = gaussian_kernels(sigma.to(x.device), size)
    taps = [k[:, j].view(-1, 1, 1, 1) for j in range(size)]
    xp = torch.nn.functional.pad(x, (0, 0, r, r), mode="reflect")
    v = xp[:, :, r:r + h] * taps[r]
    for i in range(1, r + 1):
        v += (xp[:, :, r - i:r - i + h] + xp[:, :, r + i:r + i + h]) * taps[r - i]
    vp = torch.nn.functional.pad(v, (r, r, 0, 0), mode="reflect")
    out = vp[..., r:r + w] * taps[r]
    for i in range(1, r + 1):
        out += (vp[..., r - i:r - i + w] + vp[..., r + i:r + i + w]) * taps[r - i]
    return out


def solarize(x: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """Invert values >= ``threshold`` (128 of 255)."""
    return torch.where(x >= threshold, MAX_VALUE - x, x)


_JITTER_OPS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast,
               SATURATION: adjust_saturation, HUE: adjust_hue}


# --------------------------------------------------------------------------- the module


class PhotometricAugment:
    """Applies the photometric part of DINOv2's augmentation to a batch on any device.

    ``apply(batch)`` takes a ``data.gpu_augment`` batch (uint8 or [0, 255] float crops and
    ``batch["photometric"]``) and returns it with normalised float32 crops on the crops' device
    and the parameters removed: exactly the batch contract of ``data.gpu_augment: false``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = [255.0 * float(m) for m in mean]  # python floats, as the CPU path
        self.inv_std = [1.0 / (255.0 * float(sd)) for sd in std]

    @classmethod
    def from_config(cls, cfg: CropConfig) -> PhotometricAugment:
        """The module for ``cfg.mean`` / ``cfg.std``."""
        return cls(cfg.mean, cfg.std)

    def crops(self, crops: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """uint8 or [0, 255] float (N, 3, H, W) crops + their parameters -> normalised float32.

        Order as on the CPU: colour jitter (each sample's four ops in its own order), grey,
        blur, solarize, normalise. Each op runs once per group of samples that need it."""
        x = crops.to(dtype=torch.float32, copy=True)
        cpu = {k: v.cpu() for k, v in params.items()}  # row selection on the host: no GPU sync
        if x.shape[0] != cpu["jitter"].shape[0]:
            raise ValueError(f"{x.shape[0]} crops but photometric parameters for "
                             f"{cpu['jitter'].shape[0]}")
        jitter, order, factors = cpu["jitter"], cpu["order"], cpu["factors"]
        for position in range(4):
            for op, fn in _JITTER_OPS.items():
                chosen = jitter & (order[:, position] == op)
                if op == HUE:
                    chosen &= factors[:, HUE] != 0.0  # the CPU path skips a zero hue shift
                self._apply_rows(x, chosen, lambda t, f, fn=fn, op=op: fn(t, f[:, op]), factors)
        self._apply_rows(x, cpu["gray"], lambda t, _: to_gray(t).expand_as(t))
        self._apply_rows(x, cpu["blur"], lambda t, s: gaussian_blur(t, s), cpu["blur_sigma"])
        self._apply_rows(x, cpu["solarize"], lambda t, _: solarize(t))
        mean = torch.tensor(self.mean, dtype=torch.float64).to(x.device, torch.float32)
        inv_std = torch.tensor(self.inv_std, dtype=torch.float64).to(x.device, torch.float32)
        return x.sub_(mean.view(1, 3, 1, 1)).mul_(inv_std.view(1, 3, 1, 1))

    @staticmethod
    def _apply_rows(x: Tensor, chosen: Tensor, fn, values: Tensor | None = None) -> None:  # noqa: ANN001
        """x[rows] = fn(x[rows], values[rows]) for the rows where ``chosen`` (a host mask)."""
        rows = chosen.nonzero().flatten()
        if rows.numel() == 0:
            return
        picked = values[rows] if values is not None else None
        if rows.numel() == x.shape[0]:
            x.copy_(fn(x, picked))
            return
        idx = rows.to(x.device, non_blocking=True)
        x[idx] = fn(x[idx], picked)  # index_put: deterministic under use_deterministic_algorithms

    def apply(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch with normalised crops, on the device its crops are on (see the class)."""
        out = dict(batch)
        params = out.pop(PARAMS_KEY)
        for key in CROP_KEYS:
            if out[key].numel():
                out[key] = self.crops(out[key], params[key])
        return out

    __call__ = apply


def apply_photometric(batch: Any, device: torch.device | str) -> Any:
    """The trainer's hook: move a ``data.gpu_augment`` batch's crops to ``device`` and apply
    :class:`PhotometricAugment` there. Any other batch is returned unchanged."""
    if not isinstance(batch, Mapping) or PARAMS_KEY not in batch:
        return batch
    params = batch[PARAMS_KEY]
    moved = dict(batch)
    for key in CROP_KEYS:
        moved[key] = batch[key].to(device, non_blocking=True)
    return PhotometricAugment(params["mean"].tolist(), params["std"].tolist()).apply(moved)
