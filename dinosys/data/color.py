"""Colour operations on planar float32 images (3, H, W) with values in [0, 255].

Semantics of ``torchvision.transforms.functional`` on tensors (clamped after every op), on the
uint8 value scale so no /255 pass is needed; nothing is rounded between ops. Planar float32
keeps every op a few vectorised passes over row tiles that stay in cache, several times faster
than Pillow's per-pixel HSV conversions.
"""

from __future__ import annotations

import numpy as np

GRAY_WEIGHTS = np.asarray([0.2989, 0.587, 0.114], dtype=np.float32)  # torchvision's weights
BLUR_KERNEL_SIZE = 9
MAX_VALUE = 255.0
TILE_PIXELS = 12_288  # per plane: a tile's working set of ~10 planes stays in L2 cache


def _tile_rows(width: int) -> int:
    return max(1, TILE_PIXELS // max(1, width))


def _by_row_tiles(fn, x: np.ndarray, *args) -> np.ndarray:  # noqa: ANN001
    """Apply an elementwise ``fn`` to row tiles of ``x`` (same result, far fewer cache misses)."""
    rows = _tile_rows(x.shape[-1])
    if x.shape[-2] <= rows:
        return fn(x, *args)
    out = np.empty(x.shape, dtype=np.float32)
    for r0 in range(0, x.shape[-2], rows):
        out[..., r0:r0 + rows, :] = fn(x[..., r0:r0 + rows, :], *args)
    return out


def to_gray(x: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (H, W) luma with torchvision's weights (one BLAS gemv)."""
    return (GRAY_WEIGHTS @ x.reshape(3, -1)).reshape(x.shape[1:])


def _blend(x: np.ndarray, other: np.ndarray | float, factor: float) -> np.ndarray:
    """clamp(factor * x + (1 - factor) * other); both inputs in [0, MAX_VALUE]."""
    out = np.multiply(x, factor, dtype=np.float32)
    out += (1.0 - factor) * other
    if factor > 1.0:  # a convex combination (factor <= 1) of in-range values needs no clamp
        np.clip(out, 0.0, MAX_VALUE, out=out)
    return out


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
    """Multiply by ``factor``, clamp."""
    out = np.multiply(x, factor, dtype=np.float32)
    if factor > 1.0:
        np.minimum(out, MAX_VALUE, out=out)
    return out


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level of the image."""
    mean = float(GRAY_WEIGHTS @ x.reshape(3, -1).mean(axis=1))
    return _blend(x, mean, factor)


def _saturation(x: np.ndarray, factor: float) -> np.ndarray:
    return _blend(x, to_gray(x)[None], factor)


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the per-pixel grey image."""
    return _by_row_tiles(_saturation, x, factor)


def adjust_hue(x: np.ndarray, hue_factor: float) -> np.ndarray:
    """Rotate the HSV hue by ``hue_factor`` turns (in [-0.5, 0.5]); S and V are unchanged.

    Same result as torchvision's rgb->hsv, shift, hsv->rgb, computed without the HSV round trip:
    with V = max, chroma C = max - min, a channel's value is min + C * f(hue), f piecewise linear.
    """
    if hue_factor == 0.0:
        return x
    return _by_row_tiles(_hue, x, hue_factor)


def _hue(x: np.ndarray, hue_factor: float) -> np.ndarray:
    r, g, b = x[0], x[1], x[2]
    hi = np.maximum(r, g)
    np.maximum(hi, b, out=hi)
    lo = np.minimum(r, g)
    np.minimum(lo, b, out=lo)
    chroma = hi - lo
    inv = np.divide(1.0, chroma, out=np.zeros_like(chroma), where=chroma > 0)
    # hue in sextants: red 0, yellow 1, green 2, cyan 3, blue 4, magenta 5 (r wins ties, then g)
    h_b = np.subtract(r, g)
    h_b *= inv
    h_b += 4.0
    h_g = np.subtract(b, r)
    h_g *= inv
    h_g += 2.0
    h_r = np.subtract(g, b)
    h_r *= inv
    # np.where, not np.copyto(where=...): the masked copy is ~10x slower
    h = np.where(hi == r, h_r, np.where(hi == g, h_g, h_b))
    t = h_b
    h += 6.0 * hue_factor
    np.multiply(h, 1.0 / 6.0, out=t)
    np.floor(t, out=t)
    t *= 6.0
    h -= t  # wrapped to [0, 6); np.mod is ~50x slower than this
    out = np.empty_like(x)
    for c, centre in ((0, 3.0), (1, 2.0), (2, 4.0)):
        np.subtract(h, centre, out=t)
        np.abs(t, out=t)
        if c == 0:
            t -= 1.0
        else:
            np.subtract(2.0, t, out=t)
        np.clip(t, 0.0, 1.0, out=t)
        t *= chroma
        np.add(t, lo, out=out[c])
    return out


def gaussian_kernel(sigma: float, size: int = BLUR_KERNEL_SIZE) -> np.ndarray:
    """The normalised 1-D Gaussian torchvision's GaussianBlur(kernel_size=size) uses."""
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float, size: int = BLUR_KERNEL_SIZE) -> np.ndarray:
    """Separable Gaussian (kernel ``size``, torch "reflect" padding) over the last two axes.

    Works through row tiles so the working set stays in cache. The vertical pass adds whole
    shifted row blocks; the horizontal pass runs on the flattened column-padded tile, so every
    numpy call is one long contiguous loop (short per-row loops cost more than the arithmetic).
    The kernel is symmetric: one multiply per pair of taps.
    """
    k = [float(v) for v in gaussian_kernel(sigma, size)]  # python floats: faster ufunc scalars
    r = size // 2
    h, w = x.shape[-2:]
    if min(h, w) <= r:
        raise ValueError(f"image {(h, w)} too small for a {size}-tap blur")
    lead = x.shape[:-2]
    xp = np.empty(lead + (h + 2 * r, w), dtype=np.float32)  # rows padded: d c b | a b c d
    xp[..., r:r + h, :] = x
    for i in range(1, r + 1):
        xp[..., r - i, :] = x[..., i, :]
        xp[..., r + h - 1 + i, :] = x[..., h - 1 - i, :]
    out = np.empty(lead + (h, w), dtype=np.float32)
    rows = _tile_rows(w)
    for r0 in range(0, h, rows):
        n = min(rows, h - r0)
        v = np.multiply(xp[..., r0 + r:r0 + r + n, :], k[r])
        pair = np.empty_like(v)
        for i in range(1, r + 1):
            np.add(xp[..., r0 + r - i:r0 + r - i + n, :], xp[..., r0 + r + i:r0 + r + i + n, :],
                   out=pair)
            pair *= k[r - i]
            v += pair
        vp = np.empty(lead + (n, w + 2 * r), dtype=np.float32)
        vp[..., r:r + w] = v
        for i in range(1, r + 1):
            vp[..., r - i] = v[..., i]
            vp[..., r + w - 1 + i] = v[..., w - 1 - i]
        flat = vp.reshape(-1)
        m = flat.size - 2 * r
        acc = np.empty_like(flat)
        np.multiply(flat[r:r + m], k[r], out=acc[:m])
        tmp = np.empty(m, dtype=np.float32)
        for i in range(1, r + 1):
            np.add(flat[r - i:r - i + m], flat[r + i:r + i + m], out=tmp)
            tmp *= k[r - i]
            acc[:m] += tmp
        # acc[j] holds padded position j + r: row y, column c sits at y * (w + 2r) + c
        out[..., r0:r0 + n, :] = acc.reshape(lead + (n, w + 2 * r))[..., :w]
    return out


def solarize(x: np.ndarray, threshold: float = 128.0) -> np.ndarray:
    """Invert values >= threshold (Pillow's ImageOps.solarize(128))."""
    out = np.array(x, dtype=np.float32)
    np.subtract(MAX_VALUE, x, out=out, where=x >= threshold)
    return out
