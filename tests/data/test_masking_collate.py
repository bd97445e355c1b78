"""iBOT block masks (stratified ratios) and the SSL batch dict format."""

from __future__ import annotations

import numpy as np
import torch

from dinosys.data.collate import collate_ssl
from dinosys.data.masking import MaskConfig, MaskGenerator


def test_block_masks_respect_budget_and_blocks() -> None:
    gen = MaskGenerator(16, MaskConfig())
    rng = np.random.default_rng(0)
    assert not gen(0, rng).any()
    with_neighbour, total = 0, 0
    for target in (4, 25, 60, 128):
        for _ in range(20):
            m = gen(target, rng)
            assert m.shape == (16, 16) and m.dtype == bool
            assert 0 < m.sum() <= target
            padded = np.pad(m, 1)
            nb = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
            with_neighbour += int(nb[m].sum())
            total += int(m.sum())
    # unions of rectangles of >= 4 patches (only a last small remainder block may be smaller),
    # not scattered patches: random masks of this density would leave most patches isolated
    assert with_neighbour / total > 0.95
    big = [gen(128, rng).sum() for _ in range(20)]
    assert np.mean(big) > 0.8 * 128  # blocks reach the target, not just a single block


def test_batch_ratio_strata() -> None:
    cfg = MaskConfig(mask_probability=0.5, ratio_min=0.1, ratio_max=0.5)
    gen = MaskGenerator(16, cfg)
    n_images, n = 64, 256
    counts = []
    for seed in range(10):
        masks = gen.batch(n_images, np.random.default_rng(seed))
        assert masks.shape == (n_images, n)
        per_image = masks.sum(1)
        assert (per_image > 0).sum() == int(n_images * cfg.mask_probability)  # 32 masked
        counts.append(np.sort(per_image[per_image > 0]))
    counts = np.stack(counts)
    bounds = np.linspace(0.1, 0.5, 33) * n
    # the i-th smallest masked count stays under the i-th stratum's upper bound (+ overshoot 0)
    assert (counts <= bounds[1:] + 1e-9).all()
    # and the strata are used: the spread covers the ratio range, mean near the middle
    assert counts[:, 0].mean() < 0.15 * n and counts[:, -1].mean() > 0.4 * n
    assert 0.22 * n < counts.mean() < 0.32 * n
    # the masked images are in random positions, not always the first half
    positions = [np.flatnonzero(gen.batch(8, np.random.default_rng(s)).any(1)) for s in range(6)]
    assert len({tuple(p) for p in positions}) > 1
    none = MaskGenerator(16, MaskConfig(mask_probability=0.0)).batch(8, np.random.default_rng(0))
    assert not none.any()


def test_mask_determinism() -> None:
    gen = MaskGenerator(14, MaskConfig())
    a = gen.batch(16, np.random.default_rng(3))
    b = gen.batch(16, np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_collate_format_crop_major() -> None:
    batch_size, n_local = 3, 4
    samples = []
    for i in range(batch_size):
        samples.append({
            "global_crops": [np.full((3, 16, 16), 10 * i + c, np.float32) for c in range(2)],
            "local_crops": [np.full((3, 8, 8), 100 + 10 * i + c, np.float32)
                            for c in range(n_local)],
            "label": i + 5,
        })
    gen = MaskGenerator(4, MaskConfig())
    batch = collate_ssl(samples, gen, np.random.default_rng(0))
    assert set(batch) == {"global_crops", "local_crops", "masks", "mask_indices", "mask_weights",
                          "n_masked", "batch_size", "labels"}
    g, loc = batch["global_crops"], batch["local_crops"]
    assert g.shape == (2 * batch_size, 3, 16, 16) and g.dtype == torch.float32
    assert loc.shape == (n_local * batch_size, 3, 8, 8)
    for c in range(2):  # crop-major: all images' crop 0, then all images' crop 1
        for i in range(batch_size):
            assert g[c * batch_size + i, 0, 0, 0] == 10 * i + c
    for c in range(n_local):
        for i in range(batch_size):
            assert loc[c * batch_size + i, 0, 0, 0] == 100 + 10 * i + c
    masks = batch["masks"]
    assert masks.shape == (2 * batch_size, 16) and masks.dtype == torch.bool
    flat = masks.flatten()
    assert torch.equal(batch["mask_indices"], flat.nonzero().flatten())
    assert batch["mask_indices"].dtype == torch.long
    assert batch["n_masked"] == int(flat.sum()) == batch["mask_weights"].numel()
    per_image = masks.sum(1)
    image_of = batch["mask_indices"] // 16
    expected = 1.0 / per_image[image_of].float()
    assert torch.allclose(batch["mask_weights"], expected)
    masked_images = int((per_image > 0).sum())
    assert abs(float(batch["mask_weights"].sum()) - masked_images) < 1e-4
    assert batch["batch_size"] == batch_size
    assert torch.equal(batch["labels"], torch.tensor([5, 6, 7]))


def test_collate_without_locals_or_labels() -> None:
    samples = [{"global_crops": [torch.zeros(3, 8, 8), torch.ones(3, 8, 8)], "local_crops": []}
               for _ in range(2)]
    batch = collate_ssl(samples, MaskGenerator(2, MaskConfig()), np.random.default_rng(0))
    assert batch["local_crops"].numel() == 0
    assert torch.equal(batch["labels"], torch.tensor([-1, -1]))
    assert batch["global_crops"][2:].eq(1).all()


def test_collate_normalises_uint8_crops() -> None:
    crop = np.zeros((4, 4, 3), np.uint8)
    crop[..., 0] = 255
    samples = [{"global_crops": [crop, crop], "local_crops": [crop]}]
    batch = collate_ssl(samples, None, np.random.default_rng(0), mean=(0.5, 0.5, 0.5),
                        std=(0.5, 0.5, 0.5))
    assert batch["global_crops"].shape == (2, 3, 4, 4)
    assert torch.allclose(batch["global_crops"][:, 0], torch.ones(1))
    assert torch.allclose(batch["global_crops"][:, 1], -torch.ones(1))
    assert batch["masks"].shape == (2, 0) and batch["n_masked"] == 0
