"""Linear probe on frozen features (the DINOv2 linear-evaluation protocol).

Inputs: the class tokens of the last 1 or 4 blocks, each with or without the average-pooled
patch tokens of the last block. One linear head per (learning rate, input variant) — 13 x 4 = 52
by default — is trained on the same mini-batches from one feature extraction (per epoch when
augmenting, else once and cached): SGD with momentum 0.9, no weight decay, cosine schedule to 0,
learning rates scaled by batch / 256. The head with the best top-1 on a held-out part of the
training folder (stratified, ``holdout`` of each class; ties broken by its cross-entropy) is the
result, reported on the val folder; the whole grid is in the JSON. Deterministic for a seed. In
a distributed job the extraction is sharded over the ranks and every rank trains the same heads
on the gathered features, so any number of ranks gives the result of one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dinosys.errors import UserError
from dinosys.eval.augment import random_resized_crop_flip
from dinosys.eval.features import FEATURES, extract_features, progress_bar
from dinosys.eval.images import ImageSet, load_class_folders
from dinosys.eval.linear_grid import LinearGrid, Variant, minibatches, stratified_split
from dinosys.eval.models import EvalModel, frozen
from dinosys.eval.registry import register_evaluator

log = logging.getLogger(__name__)

DINOV2_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]


@dataclass
class LinearConfig:
    """``dinosys eval linear``: the DINOv2 linear probe, a grid of heads on frozen features."""

    train: str = field(metadata={"help": "image folder DIR/<class>/<image>", "path": True})
    val: str = field(metadata={"help": "image folder DIR/<class>/<image> (reported)",
                               "path": True})
    lrs: list[float] = field(default_factory=lambda: list(DINOV2_LRS),
                             metadata={"help": "base learning rates (scaled by batch / 256)"})
    n_blocks: list[int] = field(default_factory=lambda: [1, 4], metadata={
        "help": "input variants: class tokens of the last N blocks"})
    avgpool: list[bool] = field(default_factory=lambda: [False, True], metadata={
        "help": "input variants: without / with the average-pooled patch tokens"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    epoch_length: int = field(default=0, metadata={
        "help": "steps per epoch (0: one pass over the training part; DINOv2 used 1250)"})
    batch_size: int = field(default=256, metadata={"help": "training batch (all ranks)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay"})
    holdout: float = field(default=0.1, metadata={
        "help": "fraction of each training class held out to pick the best head"})
    augment: bool = field(default=False, metadata={
        "help": "random-resized-crop + flip training images (features re-extracted every "
                "epoch); off: features extracted once and cached"})
    seed: int = field(default=0, metadata={"help": "heads, batches, split and augmentation"})
    extract_batch_size: int = field(default=256, metadata={"help": "images per forward pass"})

    def validate(self) -> None:
        """Non-empty grid, sensible sizes, a held-out fraction strictly between 0 and 1."""
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise UserError(f"--lrs needs positive learning rates, got {self.lrs}")
        if not self.n_blocks or any(n < 1 for n in self.n_blocks):
            raise UserError(f"--n-blocks needs block counts >= 1, got {self.n_blocks}")
        if not self.avgpool:
            raise UserError("--avgpool needs at least one of false, true")
        for name in ("epochs", "batch_size", "extract_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got "
                                f"{getattr(self, name)}")
        if self.epoch_length < 0:
            raise UserError(f"--epoch-length must be >= 0, got {self.epoch_length}")
        if not 0 < self.holdout < 1:
            raise UserError(f"--holdout must be between 0 and 1 (exclusive), got {self.holdout}")

    @property
    def variants(self) -> list[Variant]:
        return [Variant(n, a) for n in sorted(set(self.n_blocks))
                for a in sorted(set(self.avgpool))]


def _block_features(model: EvalModel, images: ImageSet, cfg: LinearConfig, progress: str,
                    epoch: int | None = None) -> dict[str, torch.Tensor]:
    """``blocks_cls`` / ``blocks_patch_mean`` (n, N, D) of the last N = max(n_blocks) blocks."""
    module, n = model.module, max(cfg.n_blocks)
    transform = None
    if epoch is not None:
        def transform(batch: torch.Tensor, index: int) -> torch.Tensor:
            return random_resized_crop_flip(batch, cfg.seed, epoch, index)
    if FEATURES["blocks"].available(module):
        return extract_features(module, images, ["blocks"], cfg.extract_batch_size, model.device,
                                progress, transform, n_blocks=n)
    if n > 1:
        raise UserError(f"linear probe with --n-blocks {n} needs intermediate layers "
                        f"({FEATURES['blocks'].requires}); {type(module).__name__} has none: "
                        "use --n-blocks 1")
    kinds = ["cls"] + (["patch_mean"] if any(cfg.avgpool) else [])
    feats = extract_features(module, images, kinds, cfg.extract_batch_size, model.device,
                             progress, transform)
    out = {"blocks_cls": feats["cls"][:, None]}
    if "patch_mean" in feats:
        out["blocks_patch_mean"] = feats["patch_mean"][:, None]
    return out


def _grid_table(grid: LinearGrid, cfg: LinearConfig, scale: float, held: dict, val: dict
                ) -> list[dict]:
    rows = []
    for i, v in enumerate(grid.variants):
        for j, lr in enumerate(cfg.lrs):
            rows.append({"variant": v.name, "n_blocks": v.n_blocks, "avgpool": v.avgpool,
                         "lr": lr, "lr_scaled": lr * scale,
                         "holdout_top1": float(held["top1"][i, j]),
                         "holdout_loss": float(held["loss"][i, j]),
                         "val_top1": float(val["top1"][i, j]),
                         "val_top5": float(val["top5"][i, j])})
    return rows


def fit_grid(cfg: LinearConfig, train_feats: Callable[[int], dict[str, torch.Tensor]],
             train_labels: torch.Tensor, held: tuple[dict[str, torch.Tensor], torch.Tensor],
             val: tuple[dict[str, torch.Tensor], torch.Tensor], n_classes: int) -> dict:
    """Train the grid of heads on ``train_feats(epoch)`` (the same dict every epoch when the
    features are cached), pick the best head by top-1 on ``held`` and report it on ``val``
    (each a (features, labels) pair). Returns ``metrics``, ``best`` and the whole ``grid``."""
    steps_per_epoch = cfg.epoch_length or -(-len(train_labels) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    scale = cfg.batch_size / 256
    dim = int(held[0]["blocks_cls"].shape[-1])
    grid = LinearGrid(cfg.variants, [lr * scale for lr in cfg.lrs], dim, n_classes, total,
                      cfg.momentum, cfg.weight_decay, cfg.seed)
    batches = minibatches(len(train_labels), cfg.batch_size, cfg.seed)
    bar = progress_bar(total, "linear heads", "step")
    for epoch in range(cfg.epochs):
        t_epoch = time.perf_counter()
        feats = train_feats(epoch)
        epoch_losses = []
        for _ in range(steps_per_epoch):
            epoch_losses.append(grid.step(feats, train_labels, next(batches)))
            bar.update(1)
        losses = torch.stack(epoch_losses).mean(dim=0)  # (variants, lrs)
        v, lr = divmod(int(losses.argmin()), len(cfg.lrs))
        log.info("linear epoch %d/%d: %d steps, lr x%.3f, best loss %.4f (%s, lr %g), "
                 "mean loss %.4f, %.1f s", epoch + 1, cfg.epochs, steps_per_epoch,
                 grid.lr_factor(), float(losses.min()), grid.variants[v].name, cfg.lrs[lr],
                 float(losses.mean()), time.perf_counter() - t_epoch)
    bar.close()
    table = _grid_table(grid, cfg, scale, grid.accuracy(*held), grid.accuracy(*val))
    # a small held-out part ties often on accuracy (one image is 1/n): its loss breaks ties
    best = max(table, key=lambda r: (r["holdout_top1"], -r["holdout_loss"]))
    metrics = {"top1": best["val_top1"], "holdout_top1": best["holdout_top1"]}
    if n_classes > 5:
        metrics["top5"] = best["val_top5"]
    return {"metrics": metrics, "top1": best["val_top1"], "best": best, "grid": table,
            "steps": total, "feature_dim": dim}


@register_evaluator("linear", LinearConfig, help="DINOv2 linear probe: a grid of lrs x feature "
                    "variants, best head picked on held-out train", needs=("blocks",))
def run(model: EvalModel, cfg: LinearConfig) -> dict:
    """Linear-probe accuracy of ``model`` on ``cfg.train`` / ``cfg.val``."""
    t0 = time.perf_counter()
    train_all, val_set = load_class_folders(model, cfg.train, cfg.val)
    kept, held = stratified_split(train_all.labels, cfg.holdout, cfg.seed)
    train_set, held_set = train_all.subset(kept.tolist()), train_all.subset(held.tolist())
    with frozen(model.module):
        cached = None if cfg.augment else _block_features(model, train_set, cfg,
                                                          "linear train features")
        held_feats = _block_features(model, held_set, cfg, "linear holdout features")
        val_feats = _block_features(model, val_set, cfg, "linear val features")
        t_extract = time.perf_counter() - t0

        def train_feats(epoch: int) -> dict[str, torch.Tensor]:
            if cached is not None:
                return cached
            return _block_features(model, train_set, cfg,
                                   f"linear train features (epoch {epoch + 1})", epoch)

        result = fit_grid(cfg, train_feats, train_set.labels, (held_feats, held_set.labels),
                          (val_feats, val_set.labels), len(train_all.classes))
    best = result["best"]
    result.update(n_train=len(train_set), n_holdout=len(held_set), n_val=len(val_set),
                  n_classes=len(train_all.classes), model=model.name, train=str(cfg.train),
                  val=str(cfg.val), image_size=model.image_size,
                  extract_seconds=round(t_extract, 2),
                  seconds=round(time.perf_counter() - t0, 2))
    log.info("linear top-1 %.4f on %d val images (best head %s, lr %g: held-out top-1 %.4f)",
             best["val_top1"], len(val_set), best["variant"], best["lr"], best["holdout_top1"])
    return result
