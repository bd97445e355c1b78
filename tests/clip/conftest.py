"""Fixtures of the image-text tests: a tiny locked backbone export and tiny clip configs."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def locked_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported 2-block ViT (28 px, patch 14) to lock under a LiT tower."""
    import torch

    from dinosys.export import save_native
    from dinosys.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("vit_tiny", img_size=28, patch_size=14, embed_dim=32, depth=2,
                            num_heads=2, layerscale_init=None)
    out = tmp_path_factory.mktemp("locked") / "backbone"
    save_native(model.eval(), out)
    return out


def clip_yaml(tmp_path: Path, shards: Path, image: str, extra: str = "") -> Path:
    """A few-second clip config on ``shards`` with image tower ``image`` (YAML mapping)."""
    path = tmp_path / "clip.yaml"
    path.write_text(f"""\
task: clip
name: clip_test
model:
  embed_dim: 16
  image: {image}
  text: {{width: 32, layers: 1, heads: 2, context_length: 16}}
image: {{size: 28, scale: [1.0, 1.0], ratio: [1.0, 1.0]}}
data:
  sources: [{{path: {shards}}}]
  batch_size_per_gpu: 8
  num_workers: 0
optim: {{iters_per_epoch: 2, warmup_epochs: 1, epochs: 3, base_lr: 1.0e-3, lr_scaling: none}}
checkpoint: {{every_n_steps: 2}}
dist: {{param_dtype: fp32}}
log: {{every_n_steps: 1, progress: false}}
{extra}""")
    return path


TRAINED_TOWER = ("{backbone: {arch: vit_tiny, img_size: 28, patch_size: 14, embed_dim: 32, "
                 "depth: 1, num_heads: 2, layerscale_init: null}}")
