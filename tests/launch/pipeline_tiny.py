"""A tiny factory pipeline for the launcher tests: curation of 500 embedded digits in 2 array
parts, then a 1-block teacher, a student, a LiT text tower, kNN/zero-shot and native exports,
each a few steps on CPU (seconds per stage)."""

from __future__ import annotations

from pathlib import Path

TINY_VIT = "{arch: vit_tiny, img_size: 28, patch_size: 14, embed_dim: 32, depth: 1, num_heads: 2}"


def write_tiny_pipeline(folder: Path, builtin: Path, pretrain_steps: int = 6,
                        parts: int = 2) -> Path:
    """Write ``folder/tiny.yaml`` (and its eval suites) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "suite.yaml").write_text(
        '- {name: digits, evaluator: knn, train: "{builtin}/digits/train", '
        'val: "{builtin}/digits/val"}\n')
    (folder / "text_suite.yaml").write_text(
        '- {name: digits, evaluator: zeroshot, val: "{builtin}/digits/val", '
        'templates: "{configs}/clip/mnist_templates.txt"}\n')
    config = folder / "tiny.yaml"
    config.write_text(f"""\
name: tinyfactory
data: {builtin}
curate:
  recipe: mnist_demo
  overrides:
    - 'sources=[{{path: "{{builtin}}/shards/digits/000000.tar"}}]'
    - 'dedup.eval_sources=[{{path: "{{builtin}}/digits/val", name: digits_val}}]'
    - cluster.levels=[4,2]
    - embed.chunk_size=128
  resources: {{parts: {parts}, timeout_min: 10}}
pretrain:
  recipe: mnist_tiny_cpu
  overrides:
    - max_steps={pretrain_steps}
    - 'model={TINY_VIT}'
    - heads.n_prototypes=64
    - heads.hidden_dim=32
    - heads.bottleneck_dim=16
    - data.batch_size_per_gpu=16
    - data.num_workers=0
    - log.every_n_steps=1
    - log.progress=false
    - checkpoint.every_n_steps=1000
    - eval.knn_every_n_steps=0
  resources: {{timeout_min: 10}}
distill:
  recipe: mnist_demo_cpu
  overrides:
    - max_steps=3
    - 'students=[{{name: small, model: {TINY_VIT}, heads: {{hidden_dim: 32, bottleneck_dim: 16}}}}]'
    - data.batch_size_per_gpu=16
    - data.num_workers=0
    - log.progress=false
    - eval.knn_train=null
    - eval.knn_val=null
    - export_formats=[native]
  resources: {{timeout_min: 10}}
text_align:
  recipe: mnist_lit_cpu
  overrides:
    - max_steps=3
    - model.text.width=32
    - model.text.layers=1
    - model.text.heads=2
    - data.batch_size_per_gpu=16
    - data.num_workers=0
    - log.progress=false
    - eval.zeroshot_every_n_steps=0
  resources: {{timeout_min: 10}}
evaluate:
  suite: {folder / 'suite.yaml'}
  text_suite: {folder / 'text_suite.yaml'}
  resources: {{timeout_min: 10}}
export:
  formats: [native]
  text_formats: [native]
  resources: {{timeout_min: 10}}
""")
    return config
