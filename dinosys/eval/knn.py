"""Weighted k-nearest-neighbour evaluation of frozen features (the DINO/DINOv2 kNN protocol).

Features: the backbone's L2-normalised CLS token. Each validation image takes the ``k`` most
similar training images (cosine similarity) and a vote ``exp(sim / T)`` per neighbour for that
neighbour's class; the prediction is the class with the largest summed vote.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinosys.errors import UserError
from dinosys.eval.images import ImageSet, load_image_folder
from dinosys.eval.models import load_eval_model, model_image_size, model_normalisation

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(model: nn.Module, images: ImageSet, batch_size: int = 256,
                     device: torch.device | str = "cpu", progress: str | None = None
                     ) -> torch.Tensor:
    """L2-normalised CLS features (n, D), fp32 on CPU, of every image of ``images`` (streamed)."""
    from tqdm import tqdm

    feats = []
    n_batches = -(-len(images) // batch_size)
    for batch in tqdm(images.batches(batch_size), total=n_batches, desc=progress,
                      disable=progress is None, leave=False):
        out = model(batch.to(device, non_blocking=True))
        cls = out["x_norm_clstoken"] if isinstance(out, dict) else out
        feats.append(F.normalize(cls.float(), dim=-1).cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 0)


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


def knn_eval_module(model: nn.Module, train: ImageSet, val: ImageSet, ks: Sequence[int] = (10, 20),
                    temperature: float = 0.07, batch_size: int = 256,
                    device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """kNN accuracy of an in-memory backbone on two image sets (same class names)."""
    if train.classes != val.classes:
        raise UserError(f"train and val folders have different classes: {train.classes} vs "
                        f"{val.classes}")
    was_training = model.training
    model.eval()
    try:
        tf = extract_features(model, train, batch_size, device,
                              "knn train features" if progress else None)
        vf = extract_features(model, val, batch_size, device,
                              "knn val features" if progress else None)
    finally:
        model.train(was_training)
    result = knn_accuracy(tf, train.labels, vf, val.labels, len(train.classes), ks, temperature)
    result.update(n_train=len(tf), n_val=len(vf), feature_dim=int(tf.shape[1]),
                  temperature=temperature, ks=list(ks))
    return result


def run_knn(model: str | nn.Module, train: Path, val: Path, ks: Sequence[int] = (10, 20),
            temperature: float = 0.07, batch_size: int = 256) -> dict:
    """kNN evaluation of ``model`` (run dir, checkpoint, exported dir, ``random:ARCH[:size]`` for a
    randomly initialised baseline, or a module) on image folders ``DIR/<class>/<image>``."""
    if not ks or any(int(k) < 1 for k in ks):
        raise UserError(f"--k needs positive neighbour counts, got {list(ks)}")
    if temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    module = load_eval_model(model) if not isinstance(model, nn.Module) else model.eval()
    size = model_image_size(module)
    mean, std = model_normalisation(None if isinstance(model, nn.Module) else model)
    train_set = load_image_folder(Path(train), size, mean, std)
    val_set = load_image_folder(Path(val), size, mean, std)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module.to(device)
    result = knn_eval_module(module, train_set, val_set, ks, temperature, batch_size, device,
                             progress=True)
    result.update(model=str(model) if not isinstance(model, nn.Module) else type(model).__name__,
                  train=str(train), val=str(val), image_size=size,
                  seconds=round(time.perf_counter() - t0, 2))
    log.info("kNN top-1 %s on %d val images", result["top1"], result["n_val"])
    return result
