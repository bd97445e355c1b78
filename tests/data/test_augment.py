"""Multi-crop augmentation: determinism, the paper's rates, crop geometry, op correctness."""

from __future__ import annotations

import colorsys
import io
import math

import numpy as np
import pytest
import torch
from data_helpers import jpeg_bytes
from PIL import Image
from scipy import ndimage

from dinosys.data import color
from dinosys.data.augment import CropConfig, MultiCropAugmentation, random_resized_crop_box
from dinosys.data.decode import decode_image

LIMIT = 10**9


def _plain_cfg(**kw) -> CropConfig:
    """No photometric op at all: crops are pure crop + resize + normalise."""
    base = dict(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p_global1=0.0,
                blur_p_global2=0.0, blur_p_local=0.0, solarize_p_global2=0.0)
    base.update(kw)
    return CropConfig(**base)


def test_shapes_and_determinism(photos: list[np.ndarray]) -> None:
    aug = MultiCropAugmentation(CropConfig())
    data = jpeg_bytes(photos[0])
    a = aug.from_bytes(data, np.random.default_rng(7), LIMIT)
    b = aug.from_bytes(data, np.random.default_rng(7), LIMIT)
    c = aug.from_bytes(data, np.random.default_rng(8), LIMIT)
    assert [x.shape for x in a["global_crops"]] == [(3, 224, 224)] * 2
    assert [x.shape for x in a["local_crops"]] == [(3, 98, 98)] * 8
    for k in ("global_crops", "local_crops"):
        for x, y in zip(a[k], b[k]):
            assert x.dtype == np.float32 and np.array_equal(x, y)
    assert not np.array_equal(a["global_crops"][0], c["global_crops"][0])
    # the PIL-image entry point gives torch tensors and the same determinism
    t1 = aug(Image.fromarray(photos[1]), np.random.default_rng(3))
    t2 = aug(Image.fromarray(photos[1]), np.random.default_rng(3))
    assert isinstance(t1["global_crops"][0], torch.Tensor)
    assert all(torch.equal(x, y) for x, y in zip(t1["local_crops"], t2["local_crops"]))


def test_rates_follow_the_paper_not_dinov2_code() -> None:
    aug = MultiCropAugmentation(CropConfig())
    rng = np.random.default_rng(0)
    n = 3000
    counts = np.zeros((10, 5))  # per crop slot: blur, solarize, jitter, gray, flip
    for _ in range(n):
        for slot, p in enumerate(aug.sample_params(500, 375, rng)):
            counts[slot] += [p.blur_sigma is not None, p.solarize, p.jitter_order is not None,
                             p.gray, p.flip]
    rate = counts / n
    tol = 4 * math.sqrt(0.25 / n)  # 4 sigma at worst-case variance
    assert rate[0, 0] == 1.0  # global 1 is always blurred (DINOv2's code: never)
    assert abs(rate[1, 0] - 0.1) < tol  # global 2: 10% (DINOv2's code: 90%)
    assert np.all(np.abs(rate[2:, 0] - 0.5) < tol)
    assert abs(rate[1, 1] - 0.2) < tol and rate[0, 1] == 0 and rate[2:, 1].sum() == 0
    assert np.all(np.abs(rate[:, 2] - 0.8) < tol)
    assert np.all(np.abs(rate[:, 3] - 0.2) < tol)
    assert np.all(np.abs(rate[:, 4] - 0.5) < tol)


def test_crop_geometry_and_jitter_ranges() -> None:
    aug = MultiCropAugmentation(CropConfig())
    rng = np.random.default_rng(1)
    orders = set()
    for _ in range(500):
        for slot, p in enumerate(aug.sample_params(640, 480, rng)):
            w, h = p.box[2] - p.box[0], p.box[3] - p.box[1]
            assert 0 <= p.box[0] and p.box[2] <= 640 and 0 <= p.box[1] and p.box[3] <= 480
            lo, hi = (0.32, 1.0) if slot < 2 else (0.05, 0.32)
            area = w * h / (640 * 480)
            assert lo * 0.97 <= area <= hi * 1.03, (slot, area)
            assert 0.75 * 0.95 <= w / h <= 4 / 3 * 1.05
            if p.jitter_order is not None:
                orders.add(p.jitter_order)
                b, c, s, hue = p.factors
                assert 0.6 <= b <= 1.4 and 0.6 <= c <= 1.4 and 0.8 <= s <= 1.2
                assert -0.1 <= hue <= 0.1
            if p.blur_sigma is not None:
                assert 0.1 <= p.blur_sigma <= 2.0
    assert len(orders) == 24  # all permutations of the four jitter ops occur
    # torchvision's central-crop fallback when no box fits (extreme aspect)
    left, top, w, h = random_resized_crop_box(1000, 10, (0.9, 1.0), np.random.default_rng(0))
    assert (w, h) == (13, 10) and top == 0


def test_crop_then_resize_matches_pillow_bicubic(photos: list[np.ndarray]) -> None:
    cfg = _plain_cfg()
    aug = MultiCropAugmentation(cfg)
    img = photos[2]
    params = aug.sample_params(img.shape[1], img.shape[0], np.random.default_rng(5))
    out = aug.crops(img, np.random.default_rng(5))
    mean = np.asarray(cfg.mean).reshape(3, 1, 1)
    std = np.asarray(cfg.std).reshape(3, 1, 1)
    for p, crop in zip(params, out["global_crops"] + out["local_crops"]):
        # torchvision's RandomResizedCrop: crop, then resize (the filter never sees outside)
        ref = Image.fromarray(img).crop(p.box).resize((p.size, p.size), Image.Resampling.BICUBIC)
        ref = (np.asarray(ref).transpose(2, 0, 1) / 255.0 - mean) / std
        diff = np.abs(crop - ref) * std * 255  # in uint8 levels
        assert diff.mean() < 0.05 and diff.max() <= 2.01


def test_reduced_decode_gives_the_same_crops(photos: list[np.ndarray]) -> None:
    """A JPEG decoded at a reduced DCT scale gives the crops of the full decode, with boxes on the
    reduced pixel grid (RandomResizedCrop of the reduced image)."""
    cfg = _plain_cfg()
    aug = MultiCropAugmentation(cfg)
    big = np.asarray(Image.fromarray(photos[0]).resize((1024, 768), Image.Resampling.BICUBIC))
    data = jpeg_bytes(big, quality=95)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    std = np.asarray(cfg.std).reshape(3, 1, 1) * 255
    mean = np.asarray(cfg.mean).reshape(3, 1, 1) * 255
    reduced_seen = False
    for seed in range(3):
        params = aug.sample_params(1024, 768, np.random.default_rng(seed))
        need = aug.min_source_size(params, 1024, 768)
        reduced = decode_image(data, LIMIT, draft_size=need)
        assert reduced.width >= need[0] and reduced.height >= need[1]
        reduced_seen |= reduced.width < 1024
        sx, sy = reduced.width / 1024, reduced.height / 768
        fast = aug.from_bytes(data, np.random.default_rng(seed), LIMIT)
        for p, crop in zip(params, fast["global_crops"] + fast["local_crops"]):
            snapped = (round(p.box[0] * sx) / sx, round(p.box[1] * sy) / sy,
                       round(p.box[2] * sx) / sx, round(p.box[3] * sy) / sy)
            ref = full.resize((p.size, p.size), Image.Resampling.BICUBIC, box=snapped)
            levels = np.abs(crop * std + mean - np.asarray(ref).transpose(2, 0, 1))
            assert levels.mean() < 2.5, levels.mean()  # DCT-domain downscale vs full decode
    assert reduced_seen


def test_flip_gray_and_solarize_applied(photos: list[np.ndarray]) -> None:
    img = photos[3]
    plain = MultiCropAugmentation(_plain_cfg()).crops(img, np.random.default_rng(2))
    flipped = MultiCropAugmentation(_plain_cfg(flip_p=1.0)).crops(img, np.random.default_rng(2))
    assert np.allclose(flipped["global_crops"][0], plain["global_crops"][0][:, :, ::-1])
    gray = MultiCropAugmentation(_plain_cfg(grayscale_p=1.0)).crops(img, np.random.default_rng(2))
    g = gray["local_crops"][0]
    cfg = CropConfig()
    raw = g * np.asarray(cfg.std).reshape(3, 1, 1) + np.asarray(cfg.mean).reshape(3, 1, 1)
    assert np.allclose(raw[0], raw[1], atol=1e-5) and np.allclose(raw[1], raw[2], atol=1e-5)
    sol = MultiCropAugmentation(_plain_cfg(solarize_p_global2=1.0)).crops(
        img, np.random.default_rng(2))
    assert np.array_equal(sol["global_crops"][0], plain["global_crops"][0])  # global 1 untouched
    assert not np.allclose(sol["global_crops"][1], plain["global_crops"][1])


# --------------------------------------------------------------------------- colour ops


def _reference_hue(x: np.ndarray, shift: float) -> np.ndarray:
    """Per-pixel colorsys HSV round trip (the definition torchvision implements)."""
    out = np.empty_like(x)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*(x[:, i, j] / 255.0))
            out[:, i, j] = np.asarray(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255.0
    return out


@pytest.mark.parametrize("shift", [-0.5, -0.1, 0.03, 0.1, 0.37])
def test_hue_matches_hsv_round_trip(photos: list[np.ndarray], shift: float) -> None:
    x = photos[0][100:124, 200:230].transpose(2, 0, 1).astype(np.float32)
    x[:, :3, :3] = 77.0  # grey pixels have no hue
    np.testing.assert_allclose(color.adjust_hue(x, shift), _reference_hue(x, shift), atol=2e-3)
    big = np.random.default_rng(0).uniform(0, 255, (3, 200, 130)).astype(np.float32)
    np.testing.assert_allclose(color.adjust_hue(big, shift),  # row tiles join seamlessly
                               np.concatenate([color.adjust_hue(big[:, :100], shift),
                                               color.adjust_hue(big[:, 100:], shift)], 1))


def test_brightness_contrast_saturation_formulas(photos: list[np.ndarray]) -> None:
    x = photos[1][:64, :80].transpose(2, 0, 1).astype(np.float32)
    gray = 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    np.testing.assert_allclose(color.adjust_brightness(x, 1.3), np.clip(x * 1.3, 0, 255),
                               rtol=1e-6)
    np.testing.assert_allclose(color.adjust_contrast(x, 0.7),
                               np.clip(0.7 * x + 0.3 * gray.mean(), 0, 255), atol=1e-3)
    np.testing.assert_allclose(color.adjust_saturation(x, 1.2),
                               np.clip(1.2 * x - 0.2 * gray[None], 0, 255), atol=1e-3)
    np.testing.assert_allclose(color.to_gray(x), gray, atol=1e-3)
    sol = color.solarize(x)
    assert np.array_equal(sol, np.where(x >= 128, 255 - x, x))


@pytest.mark.parametrize("shape", [(3, 224, 224), (3, 98, 98), (37, 300), (3, 5, 9)])
def test_blur_is_torchvision_gaussian(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(1).uniform(0, 255, shape).astype(np.float32)
    for sigma in (0.1, 0.9, 2.0):
        k = np.exp(-0.5 * (np.arange(-4, 5) / sigma) ** 2)
        k /= k.sum()
        # scipy "mirror" == torch "reflect" padding (d c b | a b c d)
        ref = ndimage.correlate1d(ndimage.correlate1d(x.astype(np.float64), k, axis=-2,
                                                      mode="mirror"), k, axis=-1, mode="mirror")
        np.testing.assert_allclose(color.gaussian_blur(x, sigma), ref, atol=2e-3)
