"""A pipeline of the pretrain and export stages only, on the embedded MNIST shards: seconds."""

from __future__ import annotations

from pathlib import Path

import pytest


def write_mini(path: Path, builtin: Path, steps: int = 4, every: int = 2,
               extra: str = "") -> Path:
    """A pipeline YAML: pretrain (``steps`` steps, a checkpoint every ``every``) -> export."""
    path.write_text(f"""
name: mini
data: {builtin}
curate: {{enabled: false}}
pretrain:
  recipe: mnist_tiny_cpu
  overrides:
    - data.builtin_root={{builtin}}
    - "data.sources=[{{path: {{builtin}}/shards/mnist}}]"
    - max_steps={steps}
    - checkpoint.every_n_steps={every}
    - eval.knn_every_n_steps=0
    - log.every_n_steps=1
    - log.progress=false
    - model.embed_dim=32
    - model.depth=2
    - model.num_heads=2
    - heads.n_prototypes=64
    - heads.hidden_dim=64
    - heads.bottleneck_dim=16
    - data.batch_size_per_gpu=8
    - data.num_workers=0
distill: {{enabled: false}}
text_align: {{enabled: false}}
evaluate: {{enabled: false}}
export: {{formats: [native]}}
{extra}""")
    return path


@pytest.fixture
def mini_config(tmp_path: Path, builtin_data: Path) -> Path:
    """The mini pipeline's YAML in ``tmp_path``."""
    return write_mini(tmp_path / "mini.yaml", builtin_data)
