"""`builtin:pixels`: centred grey pixels, the near-duplicate embedding of tiny images (MNIST)."""

from __future__ import annotations

import torch

from curation.backbone import BUILTIN_PIXELS, extract, load_feature_model


def test_pixels_ignore_brightness_and_contrast_but_not_the_digit() -> None:
    fm = load_feature_model(BUILTIN_PIXELS)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 28, 28, generator=g)
    batch = torch.stack([a, 0.7 * a + 0.1, b]).expand(-1, 3, -1, -1)  # grey as RGB
    mean, std = torch.tensor(fm.mean).view(1, 3, 1, 1), torch.tensor(fm.std).view(1, 3, 1, 1)
    emb = extract(fm, (batch - mean) / std, "cls", 1)
    assert emb.shape == (3, 28 * 28)
    sims = emb @ emb.T
    assert torch.allclose(sims[0, 1], torch.tensor(1.0), atol=1e-5)  # a brightness edit
    assert sims[0, 2] < 0.2  # another image
