"""Linear probe on frozen features (the DINOv2 linear-evaluation protocol).

Inputs: the class tokens of the last 1 or 4 blocks, each with or without the average-pooled
patch tokens of the last block. One linear head per (learning rate, input variant) — 13 x 4 = 52
by default — is trained on the same mini-batches from one feature extraction (per epoch when
augmenting, else once and cached): SGD with momentum 0.9, no weight decay, cosine schedule to 0,
learning rates scaled by batch / 256. The grid trains on the training folder less a held-out
part (stratified, ``holdout`` of each class) that picks the head: by its cross-entropy there
(``select="loss"``, ties by top-1) or its top-1 (ties by cross-entropy). The picked
(learning rate, variant) is retrained on the whole training folder (``refit``) and reported on
the val folder; the whole grid is in the JSON. Deterministic for a seed. In
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
from dinosys.eval.augment import SCALE, random_resized_crop_flip
from dinosys.eval.feature_cache import FeatureNeed
from dinosys.eval.features import FEATURES, extract_features, progress_bar
from dinosys.eval.images import ImageSet, load_class_folders
from dinosys.eval.linear_grid import (
    LinearGrid,
    Variant,
    minibatches,
    step_threads,
    stratified_split,
)
from dinosys.eval.models import EvalModel, frozen
from dinosys.eval.registry import register_evaluator

log = logging.getLogger(__name__)

SELECT = ("top1", "loss")
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
    select: str = field(default="loss", metadata={
        "help": "how the held-out part picks the head: loss (its cross-entropy; ties: top-1) "
                "or top1 (ties: loss)"})
    refit: bool = field(default=True, metadata={
        "help": "retrain the picked head (lr, variant) on the whole training folder before "
                "reporting it on val"})
    augment: bool = field(default=False, metadata={
        "help": "random-resized-crop + flip training images (features re-extracted every "
                "epoch); off: features extracted once and cached"})
    aug_scale: list[float] = field(default_factory=lambda: list(SCALE), metadata={
        "help": "with --augment: the crops' area range, as fractions of the image (as "
                "DINOv2 and torchvision)"})
    aug_flip: bool = field(default=True, metadata={
        "help": "with --augment: flip half the crops horizontally (off for digits or text)"})
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
        if self.select not in SELECT:
            raise UserError(f"--select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if len(self.aug_scale) != 2 or not 0 < self.aug_scale[0] <= self.aug_scale[1] <= 1:
            raise UserError(f"--aug-scale needs two area fractions 0 < min <= max <= 1, got "
                            f"{self.aug_scale}")
        if not 0 < self.holdout < 1:
            raise UserError(f"--holdout must be between 0 and 1 (exclusive), got {self.holdout}")

    @property
    def variants(self) -> list[Variant]:
        return [Variant(n, a) for n in sorted(set(self.n_blocks))
                for a in sorted(set(self.avgpool))]


def _block_kinds(module: torch.nn.Module, cfg: LinearConfig) -> tuple[list[str], dict]:
    """The feature kinds (and options) the probe's inputs come from."""
    if FEATURES["blocks"].available(module):
        return ["blocks"], {"n_blocks": max(cfg.n_blocks)}
    return ["cls"] + (["patch_mean"] if any(cfg.avgpool) else []), {}


def _block_features(model: EvalModel, images: ImageSet, cfg: LinearConfig, progress: str,
                    epoch: int | None = None) -> dict[str, torch.Tensor]:
    """``blocks_cls`` / ``blocks_patch_mean`` (n, N, D) of the last N = max(n_blocks) blocks."""
    module, n = model.module, max(cfg.n_blocks)
    transform = None
    if epoch is not None:
        def transform(batch: torch.Tensor, index: int) -> torch.Tensor:
            return random_resized_crop_flip(batch, cfg.seed, epoch, index,
                                            tuple(cfg.aug_scale), cfg.aug_flip)
    kinds, options = _block_kinds(module, cfg)
    if kinds == ["blocks"]:
        return extract_features(module, images, kinds, cfg.extract_batch_size, model.device,
                                progress, transform, **options)
    if n > 1:
        raise UserError(f"linear probe with --n-blocks {n} needs intermediate layers "
                        f"({FEATURES['blocks'].requires}); {type(module).__name__} has none: "
                        "use --n-blocks 1")
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


def _select_key(select: str) -> Callable[[dict], tuple]:
    """Ranking of grid rows on the held-out part (largest first)."""
    if select == "loss":  # the held-out cross-entropy; top-1 only breaks exact ties
        return lambda r: (-r["holdout_loss"], r["holdout_top1"])
    # a small held-out part ties often on accuracy (one image is 1/n): its loss breaks ties
    return lambda r: (r["holdout_top1"], -r["holdout_loss"])


def train_heads(grid: LinearGrid, cfg: LinearConfig,
                train_feats: Callable[[int], dict[str, torch.Tensor]], labels: torch.Tensor,
                rows: torch.Tensor, desc: str) -> None:
    """``cfg.epochs`` epochs of ``grid`` on the training samples ``rows`` of
    ``train_feats(epoch)`` / ``labels``: a progress bar and about ten log lines."""
    steps_per_epoch = cfg.epoch_length or -(-len(rows) // cfg.batch_size)
    batches = minibatches(len(rows), cfg.batch_size, cfg.seed)
    log_every = max(1, cfg.epochs // 10)
    with step_threads(grid.step_flops(cfg.batch_size)) as threads:
        log.info("%s: %d head(s) on %s, %d epochs x %d steps, %d samples, %d intra-op "
                 "thread(s)", desc, len(grid.variants) * len(grid.lrs), grid.device, cfg.epochs,
                 steps_per_epoch, len(rows), threads)
        bar = progress_bar(cfg.epochs * steps_per_epoch, desc, "step")
        t0 = time.perf_counter()
        for epoch in range(cfg.epochs):
            inputs = grid.inputs(train_feats(epoch))
            epoch_losses = []
            for _ in range(steps_per_epoch):
                epoch_losses.append(grid.step(inputs, labels, rows[next(batches)]))
                bar.update(1)
            if (epoch + 1) % log_every == 0 or epoch + 1 == cfg.epochs:
                losses = torch.stack(epoch_losses).mean(dim=0)  # (variants, lrs)
                v, lr = divmod(int(losses.argmin()), len(grid.lrs))
                log.info("%s: epoch %d/%d, lr x%.3f, best train loss %.4f (%s, lr %g), mean "
                         "%.4f, %.1f s", desc, epoch + 1, cfg.epochs, grid.lr_factor(),
                         float(losses.min()), grid.variants[v].name, float(grid.lrs[lr]),
                         float(losses.mean()), time.perf_counter() - t0)
        bar.close()


def fit_grid(cfg: LinearConfig, train_feats: Callable[[int], dict[str, torch.Tensor]],
             train_labels: torch.Tensor, kept: torch.Tensor,
             held: tuple[dict[str, torch.Tensor], torch.Tensor],
             val: tuple[dict[str, torch.Tensor], torch.Tensor], n_classes: int,
             device: torch.device | str = "cpu") -> dict:
    """Train the grid of heads on the samples ``kept`` of ``train_feats(epoch)`` (features of
    the whole training folder; the same dict every epoch when cached), pick the best head on
    ``held`` (by ``cfg.select``), retrain it on the whole training folder when ``cfg.refit``,
    and report it on ``val`` (each a (features, labels) pair). The heads train on ``device``
    (the features stay where they are). Returns ``metrics``, ``best``, ``refit`` and the whole
    ``grid``."""
    scale = cfg.batch_size / 256
    dim = int(held[0]["blocks_cls"].shape[-1])

    def steps(n: int) -> int:
        return cfg.epochs * (cfg.epoch_length or -(-n // cfg.batch_size))

    grid = LinearGrid(cfg.variants, [lr * scale for lr in cfg.lrs], dim, n_classes,
                      steps(len(kept)), cfg.momentum, cfg.weight_decay, cfg.seed, device)
    train_heads(grid, cfg, train_feats, train_labels, kept, "linear heads")
    table = _grid_table(grid, cfg, scale, grid.accuracy(*held), grid.accuracy(*val))
    best = max(table, key=_select_key(cfg.select))
    result = {"metrics": {"top1": best["val_top1"], "holdout_top1": best["holdout_top1"]},
              "best": best, "grid": table, "steps": grid.total_steps, "feature_dim": dim}
    reported = {"val_top1": best["val_top1"], "val_top5": best["val_top5"]}
    if cfg.refit:
        variant = Variant(best["n_blocks"], best["avgpool"])
        everything = torch.arange(len(train_labels))
        head = LinearGrid([variant], [best["lr_scaled"]], dim, n_classes, steps(len(everything)),
                          cfg.momentum, cfg.weight_decay, cfg.seed, device)
        train_heads(head, cfg, train_feats, train_labels, everything,
                    f"linear refit ({variant.name}, lr {best['lr']:g})")
        scores = head.accuracy(*val)
        reported = {"val_top1": float(scores["top1"][0, 0]),
                    "val_top5": float(scores["top5"][0, 0])}
        result["refit"] = dict(reported, variant=variant.name, lr=best["lr"],
                               steps=head.total_steps, n_train=len(everything))
    result["metrics"]["top1"] = result["top1"] = reported["val_top1"]
    if n_classes > 5:
        result["metrics"]["top5"] = reported["val_top5"]
    return result


def _rows(feats: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in feats.items()}


def feature_needs(module: torch.nn.Module, cfg: LinearConfig) -> list[FeatureNeed]:
    """The un-augmented features :func:`run` extracts (for a suite's shared extraction)."""
    kinds, options = _block_kinds(module, cfg)
    folders = [cfg.val] if cfg.augment else [cfg.train, cfg.val]
    return [FeatureNeed(f, kinds, options, cfg.extract_batch_size) for f in folders]


@register_evaluator("linear", LinearConfig, help="DINOv2 linear probe: a grid of lrs x feature "
                    "variants, best head picked on held-out train", needs=("blocks",),
                    features=feature_needs)
def run(model: EvalModel, cfg: LinearConfig) -> dict:
    """Linear-probe accuracy of ``model`` on ``cfg.train`` / ``cfg.val``."""
    t0 = time.perf_counter()
    train_set, val_set = load_class_folders(model, cfg.train, cfg.val)
    kept, held = stratified_split(train_set.labels, cfg.holdout, cfg.seed)
    with frozen(model.module):
        cached = None if cfg.augment else _block_features(model, train_set, cfg,
                                                          "linear train features")
        held_feats = (_rows(cached, held) if cached is not None else _block_features(
            model, train_set.subset(held.tolist()), cfg, "linear holdout features"))
        val_feats = _block_features(model, val_set, cfg, "linear val features")
        t_extract = time.perf_counter() - t0

        def train_feats(epoch: int) -> dict[str, torch.Tensor]:
            if cached is not None:
                return cached
            return _block_features(model, train_set, cfg,
                                   f"linear train features (epoch {epoch + 1})", epoch)

        result = fit_grid(cfg, train_feats, train_set.labels, kept,
                          (held_feats, train_set.labels[held]), (val_feats, val_set.labels),
                          len(train_set.classes), model.device)
    best = result["best"]
    result.update(n_train=len(kept), n_holdout=len(held), n_val=len(val_set),
                  n_classes=len(train_set.classes), model=model.name, train=str(cfg.train),
                  val=str(cfg.val), image_size=model.image_size,
                  extract_seconds=round(t_extract, 2),
                  seconds=round(time.perf_counter() - t0, 2))
    log.info("linear top-1 %.4f on %d val images (head %s, lr %g, picked by held-out %s: "
             "top-1 %.4f, loss %.4f%s)", result["top1"], len(val_set), best["variant"],
             best["lr"], cfg.select, best["holdout_top1"], best["holdout_loss"],
             "; retrained on all of train" if cfg.refit else "")
    return result
