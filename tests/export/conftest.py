"""Shared helpers for export tests: backbones with non-trivial random weights."""

from __future__ import annotations

import pytest
import torch

from dinosys.models import create_backbone


def randomized_backbone(arch: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A backbone whose LayerScales, tokens and mask token are far from their near-zero init,
    so that every block and embedding changes the output (parity tests can fail)."""
    torch.manual_seed(seed)
    model = create_backbone(arch, **kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.normal_(0.5, 0.1)
            elif name in ("cls_token", "register_tokens", "mask_token"):
                p.normal_()
    return model


@pytest.fixture(scope="session")
def randomized():
    """Factory fixture: ``randomized(arch, seed=0, **kw)`` -> randomized_backbone(...)."""
    return randomized_backbone


@pytest.fixture(scope="session")
def timm_module():
    from dinosys.export.compat import import_timm

    return import_timm()


@pytest.fixture(scope="session")
def transformers_module():
    from dinosys.export.compat import import_transformers

    return import_transformers()
