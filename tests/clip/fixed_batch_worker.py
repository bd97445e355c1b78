"""Worker (plain ``python`` or torchrun): the clip task through ``run_train`` on fixed batches.

Every step has the same global batch of ``GLOBAL_BATCH`` image-caption pairs whatever the world
size; rank r trains on rows ``[r * B / world, (r + 1) * B / world)``. Captions repeat inside a
batch, so the equal-captions-are-positives path crosses ranks. Usage:
``fixed_batch_worker.py RUN_DIR LOSS_KIND DATA_DIR`` -> ``RUN_DIR/metrics.jsonl`` and
``RUN_DIR/export/clip/`` (compared across world sizes by tests/clip/test_clip_dist.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import yaml

from dinosys.config import load_config
from dinosys.data.tokenizer import get_tokenizer
from dinosys.train.run import run_train
from dinosys.train.tasks import register_task
from dinosys.train.tasks.clip import ClipRunConfig, ClipTask

GLOBAL_BATCH = 8
STEPS = 3
CONTEXT = 16
CAPTIONS = ["a photo of the digit zero", "a photo of the digit one", "a handwritten three",
            "a photo of the digit one", "seven, written by hand", "a handwritten three",
            "a photo of the digit zero", "the number eight"]


class FixedBatches:
    """This rank's slice of a fixed sequence of global batches (no augmentation)."""

    def __init__(self, rank: int, world: int) -> None:
        if GLOBAL_BATCH % world:
            raise ValueError(f"global batch {GLOBAL_BATCH} does not split over {world} ranks")
        g = torch.Generator().manual_seed(1234)
        self.images = torch.randn(STEPS, GLOBAL_BATCH, 3, 28, 28, generator=g)
        self.tokens = get_tokenizer(CONTEXT)(CAPTIONS)
        per = GLOBAL_BATCH // world
        self.rows = slice(rank * per, (rank + 1) * per)

    def __iter__(self):
        for step in range(STEPS):
            images = self.images[step, self.rows]
            # captions move by one row per step: a different pairing each step
            tokens = self.tokens.roll(step, dims=0)[self.rows]
            yield {"images": images, "tokens": tokens, "text_truncated": 0,
                   "batch_size": images.shape[0]}


@register_task
class FixedBatchClip(ClipTask):
    """The clip task, trained on :class:`FixedBatches` instead of the shard loader."""

    name = "clip_fixed_batches"
    command = None

    def build_loader(self) -> FixedBatches:
        return FixedBatches(self.env.rank, self.env.world_size)


def config(kind: str, data: str, path: Path) -> ClipRunConfig:
    """A tiny trained-tower clip config written to ``path`` and loaded (no drop path: the steps
    are deterministic). ``data`` only has to exist: the batches come from FixedBatches."""
    path.write_text(yaml.safe_dump({
        "task": "clip_fixed_batches", "name": f"fixed_{kind}", "seed": 3,
        "model": {"embed_dim": 16,
                  "image": {"backbone": {"arch": "vit_tiny", "img_size": 28, "patch_size": 14,
                                         "embed_dim": 32, "depth": 2, "num_heads": 2,
                                         "layerscale_init": None, "drop_path_rate": 0.0}},
                  "text": {"width": 32, "layers": 2, "heads": 2, "context_length": CONTEXT}},
        "loss": {"kind": kind},
        "image": {"size": 28},
        "data": {"sources": [{"path": data}], "num_workers": 0,
                 "batch_size_per_gpu": GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", "1"))},
        "optim": {"iters_per_epoch": STEPS, "warmup_epochs": 0, "epochs": 1, "base_lr": 1e-2,
                  # AdamW turns rounding noise on zero-gradient weights (key biases) into
                  # +-lr steps with eps 1e-8: 1e-3 keeps the comparison about real gradients
                  "eps": 1e-3,
                  "lr_scaling": "none"},
        "checkpoint": {"every_n_steps": 0},
        "dist": {"param_dtype": "fp32"},
        "log": {"every_n_steps": 1, "progress": False},
    }))
    return load_config(ClipRunConfig, path)


if __name__ == "__main__":
    run_dir, kind, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    summary = run_train(config(kind, data, cfg_path), run_dir)
    if summary["status"] != "finished":
        raise SystemExit(f"run ended {summary['status']}")
