"""iBOT block masking (BEiT-style blocks) with DINOv2's stratified per-batch mask ratios."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dinosys.config import Section, check_bounds, check_range


@dataclass
class MaskConfig(Section):
    """iBOT block masking of the student's global crops."""

    mask_probability: float = 0.5  # share of images whose global crops get iBOT masks
    ratio_min: float = 0.1  # smallest masked share of patches
    ratio_max: float = 0.5  # largest masked share of patches
    min_patches_per_block: int = 4  # smallest masked block, in patches
    # smallest block aspect ratio (log-uniform in [aspect_min, 1/aspect_min])
    aspect_min: float = 0.3

    def validate(self) -> None:
        check_range(self.mask_probability, "masking.mask_probability", 0.0, 1.0)
        check_range(self.ratio_min, "masking.ratio_min", 0.0, 1.0)
        check_range(self.ratio_max, "masking.ratio_max", self.ratio_min, 1.0)
        check_bounds(self, "masking", {"min_patches_per_block": (1, None),
                                       "aspect_min": (1e-6, 1)})


class MaskGenerator:
    """Block masks on a ``grid x grid`` patch grid.

    ``gen(n, rng)`` masks about ``n`` patches with rectangular blocks (at least
    ``cfg.min_patches_per_block`` patches each, aspect log-uniform in [aspect_min, 1/aspect_min],
    at most half the grid per block). ``gen.batch(n_images, rng)`` gives DINOv2's batch scheme:
    ``int(n_images * mask_probability)`` images get ratios drawn from consecutive strata of
    ``linspace(ratio_min, ratio_max)``, the others no mask, in shuffled order.
    """

    def __init__(self, grid: int, cfg: MaskConfig) -> None:
        if grid < 1:
            raise ValueError(f"mask grid must be >= 1, got {grid}")
        self.grid = grid
        self.cfg = cfg
        self.num_patches = grid * grid
        self.min_block = cfg.min_patches_per_block
        self.max_block = 0.5 * self.num_patches
        self.log_aspect = (math.log(cfg.aspect_min), math.log(1.0 / cfg.aspect_min))

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try up to 10 blocks; mask the first adding 1..budget new patches; return that count."""
        for _ in range(10):
            # BEiT draws uniform(min_block, budget) even when budget < min_block
            target = self.min_block + (budget - self.min_block) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < self.grid and h < self.grid:
                top = int(rng.integers(0, self.grid - h + 1))
                left = int(rng.integers(0, self.grid - w + 1))
                region = mask[top:top + h, left:left + w]
                new = h * w - int(region.sum())
                if 0 < new <= budget:
                    region[...] = True
                    return new
        return 0

    def __call__(self, n_masked: int, rng: np.random.Generator) -> np.ndarray:
        """A (grid, grid) bool mask with about ``n_masked`` patches (fewer if blocks stall)."""
        mask = np.zeros((self.grid, self.grid), dtype=bool)
        count = 0
        while count < n_masked:
            budget = int(min(n_masked - count, self.max_block))
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask

    def batch(self, n_images: int, rng: np.random.Generator) -> np.ndarray:
        """(n_images, grid*grid) bool masks with stratified ratios (see the class docstring)."""
        cfg = self.cfg
        n_masked_images = int(n_images * cfg.mask_probability)
        bounds = np.linspace(cfg.ratio_min, cfg.ratio_max, n_masked_images + 1)
        masks = np.zeros((n_images, self.num_patches), dtype=bool)
        for i in range(n_masked_images):
            ratio = rng.uniform(bounds[i], bounds[i + 1])
            masks[i] = self(int(self.num_patches * ratio), rng).reshape(-1)
        return masks[rng.permutation(n_images)]
