"""Weighted k-nearest-neighbour evaluation of frozen features (the DINO/DINOv2 kNN protocol).

Features: the backbone's L2-normalised class token (``encode_image`` for image-text models).
Each validation image takes the ``k`` most similar training images (cosine similarity) and a
vote ``exp(sim / T)`` per neighbour for that neighbour's class; the prediction is the class with
the largest summed vote.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinosys.errors import UserError
from dinosys.eval.feature_cache import FeatureNeed
from dinosys.eval.features import default_image_feature, extract_features
from dinosys.eval.images import ImageSet, load_class_folders
from dinosys.eval.models import EvalModel, as_eval_model, frozen
from dinosys.eval.registry import register_evaluator

log = logging.getLogger(__name__)


@dataclass
class KnnConfig:
    """``dinosys eval knn``: weighted kNN on L2-normalised global features."""

    train: str = field(metadata={"help": "image folder DIR/<class>/<image>", "path": True})
    val: str = field(metadata={"help": "image folder DIR/<class>/<image>", "path": True})
    k: list[int] = field(default_factory=lambda: [10, 20],
                         metadata={"help": "neighbour counts"})
    temperature: float = field(default=0.07, metadata={"help": "vote temperature T"})
    feature: str = field(default="auto", metadata={
        "help": "feature kind: cls, image (encode_image), or auto (image for image-text "
                "models, else cls)"})
    batch_size: int = field(default=256, metadata={"help": "images per forward pass"})

    def validate(self) -> None:
        """Positive neighbour counts and temperature."""
        if not self.k or any(int(k) < 1 for k in self.k):
            raise UserError(f"--k needs positive neighbour counts, got {list(self.k)}")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 n_classes: int, k: int, temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Class scores (n_val, n_classes) from weighted votes of the ``k`` nearest training samples."""
    k = min(k, len(train_feats))
    scores = []
    for start in range(0, len(val_feats), chunk):
        sim = val_feats[start:start + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), n_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, n_classes: int, ks: Sequence[int] = (10, 20),
                 temperature: float = 0.07) -> dict:
    """``{"top1": {k: acc}, "top5": {k: acc}}`` (top5 only when there are more than 5 classes)."""
    result: dict = {"top1": {}, "top5": {}}
    for k in ks:
        scores = knn_classify(train_feats, train_labels, val_feats, n_classes, k, temperature)
        ranked = scores.argsort(dim=1, descending=True)
        result["top1"][str(k)] = float((ranked[:, 0] == val_labels).float().mean())
        if n_classes > 5:
            hit5 = (ranked[:, :5] == val_labels[:, None]).any(dim=1)
            result["top5"][str(k)] = float(hit5.float().mean())
    if not result["top5"]:
        del result["top5"]
    return result


def knn_on_sets(model: EvalModel, train: ImageSet, val: ImageSet, cfg: KnnConfig) -> dict:
    """kNN accuracy of ``model`` on two loaded image sets with the same classes."""
    module = model.module
    kind = _kind(module, cfg)
    with frozen(module):
        feats = [F.normalize(extract_features(
            module, images, [kind], cfg.batch_size, model.device,
            f"knn {split} features")[kind], dim=-1)
            for split, images in (("train", train), ("val", val))]
    tf, vf = feats
    result = knn_accuracy(tf, train.labels, vf, val.labels, len(train.classes), cfg.k,
                          cfg.temperature)
    metrics = {f"top1_k{k}": v for k, v in result["top1"].items()}
    metrics.update({f"top5_k{k}": v for k, v in result.get("top5", {}).items()})
    result.update(metrics=metrics, n_train=len(tf), n_val=len(vf),
                  feature_dim=int(tf.shape[1]), feature=kind, temperature=cfg.temperature,
                  ks=list(cfg.k))
    return result


def _kind(module: nn.Module, cfg: KnnConfig) -> str:
    return default_image_feature(module) if cfg.feature == "auto" else cfg.feature


def feature_needs(module: nn.Module, cfg: KnnConfig) -> list[FeatureNeed]:
    """The train and val features :func:`run` extracts (for a suite's shared extraction)."""
    kind = _kind(module, cfg)
    return [FeatureNeed(cfg.train, [kind], {}, cfg.batch_size),
            FeatureNeed(cfg.val, [kind], {}, cfg.batch_size)]


@register_evaluator("knn", KnnConfig, help="weighted kNN on L2-normalised cls features",
                    needs=("cls", "image"), features=feature_needs)
def run(model: EvalModel, cfg: KnnConfig) -> dict:
    """kNN evaluation of ``model`` on ``cfg.train`` / ``cfg.val`` (``DIR/<class>/<image>``)."""
    t0 = time.perf_counter()
    train, val = load_class_folders(model, cfg.train, cfg.val)
    result = knn_on_sets(model, train, val, cfg)
    result.update(model=model.name, train=str(cfg.train), val=str(cfg.val),
                  image_size=model.image_size, seconds=round(time.perf_counter() - t0, 2))
    log.info("kNN top-1 %s on %d val images", result["top1"], result["n_val"])
    return result


def run_knn(model: str | nn.Module, train: Path, val: Path, ks: Sequence[int] = (10, 20),
            temperature: float = 0.07, batch_size: int = 256) -> dict:
    """kNN evaluation of ``model`` (run dir, checkpoint, exported dir, ``random:ARCH[:size]`` for a
    randomly initialised baseline, or a module) on image folders ``DIR/<class>/<image>``."""
    from dinosys.eval.registry import run_evaluator

    cfg = KnnConfig(train=str(train), val=str(val), k=list(ks), temperature=temperature,
                    batch_size=batch_size)
    cfg.validate()
    result = run_evaluator("knn", as_eval_model(model), cfg)
    result.pop("config", None)
    return result
