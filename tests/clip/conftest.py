"""Tiny clip configs of the image-text tests (the frozen backbone LiT locks is the shared
``tiny_export`` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path


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
