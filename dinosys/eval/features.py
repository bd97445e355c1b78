"""The feature extractor every evaluator shares, and the registry of feature kinds.

A *feature kind* turns a batch of preprocessed images into named per-image tensors:

========== ===================================================== ==============================
kind       tensors (per image)                                   the model needs
========== ===================================================== ==============================
cls        ``cls`` (D): the final normalised class token          ``forward(x)`` dict with
                                                                  ``x_norm_clstoken`` (or a
                                                                  (B, D) tensor)
patch_mean ``patch_mean`` (D): mean of the final normalised       ``x_norm_patchtokens``
           patch tokens
blocks     ``blocks_cls`` (n, D) and ``blocks_patch_mean``        ``get_intermediate_layers``
           (n, D): class token and mean patch token of the last
           ``n_blocks`` blocks, each through the final norm
           (DINOv2's linear-probe inputs)
image      ``image`` (E): ``encode_image(x)`` (CLIP models)       ``encode_image``
========== ===================================================== ==============================

Register another kind with :func:`register_feature`; evaluators then request it by name.
:func:`extract_features` runs the kinds an evaluator asks for on one forward pass per batch,
shards the batches over the ranks of a distributed job (batch ``i`` on rank ``i % world``, so
every batch holds the same images as in a single-process run) and all-gathers the result onto
every rank, in the order of the image set. Inside :func:`sharded_over` the ranks are those of
one process group (a model that lives on a subgroup of ranks, e.g. a distillation student).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinosys.errors import UserError
from dinosys.eval.images import ImageSet

log = logging.getLogger(__name__)

# compute(module, images, cache, **options) -> {name: (B, ...) tensor}; ``cache`` holds what one
# forward produced for this batch, so kinds that share a forward pay for it once
FeatureFn = Callable[..., dict[str, Tensor]]


@dataclass(frozen=True)
class FeatureKind:
    """A named way of getting per-image features out of a model."""

    name: str
    compute: FeatureFn
    requires: str  # what the model must offer, for error messages
    available: Callable[[nn.Module], bool]


FEATURES: dict[str, FeatureKind] = {}


def register_feature(name: str, requires: str,
                     available: Callable[[nn.Module], bool] = lambda m: True
                     ) -> Callable[[FeatureFn], FeatureFn]:
    """Decorator: register ``compute(module, images, cache, **options)`` as feature kind
    ``name``; ``available(module)`` says whether a model can produce it (checked before any
    image is read) and ``requires`` names what is missing when it cannot."""

    def decorate(fn: FeatureFn) -> FeatureFn:
        FEATURES[name] = FeatureKind(name, fn, requires, available)
        return fn

    return decorate


def _forward(module: nn.Module, images: Tensor, cache: dict) -> Any:
    if "forward" not in cache:
        cache["forward"] = module(images)
    return cache["forward"]


def _has_method(name: str) -> Callable[[nn.Module], bool]:
    return lambda m: callable(getattr(m, name, None))


@register_feature("cls", requires="a forward() giving x_norm_clstoken (or a (B, D) tensor)")
def _cls(module: nn.Module, images: Tensor, cache: dict, **_: Any) -> dict[str, Tensor]:
    out = _forward(module, images, cache)
    if isinstance(out, dict):
        if "x_norm_clstoken" not in out:
            raise UserError(f"{type(module).__name__} gives no class token (x_norm_clstoken)")
        return {"cls": out["x_norm_clstoken"]}
    if isinstance(out, Tensor) and out.dim() == 2:
        return {"cls": out}
    raise UserError(f"{type(module).__name__} gives neither a feature dict nor (B, D) features")


@register_feature("patch_mean", requires="a forward() giving x_norm_patchtokens")
def _patch_mean(module: nn.Module, images: Tensor, cache: dict, **_: Any) -> dict[str, Tensor]:
    out = _forward(module, images, cache)
    patches = out.get("x_norm_patchtokens") if isinstance(out, dict) else None
    if patches is None or patches.shape[1] == 0:
        raise UserError(f"{type(module).__name__} gives no patch tokens (x_norm_patchtokens)")
    return {"patch_mean": patches.mean(dim=1)}


@register_feature("blocks", requires="get_intermediate_layers (a ViT backbone)",
                  available=_has_method("get_intermediate_layers"))
def _blocks(module: nn.Module, images: Tensor, cache: dict, n_blocks: int = 1,
            **_: Any) -> dict[str, Tensor]:
    depth = getattr(module, "n_blocks", None)
    if depth is not None and n_blocks > depth:
        raise UserError(f"features of the last {n_blocks} blocks asked for, but the model has "
                        f"{depth} blocks")
    outs = module.get_intermediate_layers(images, n=n_blocks, return_class_token=True)
    if outs[0][0].shape[1] == 0:
        raise UserError(f"{type(module).__name__} gives no patch tokens")
    return {"blocks_cls": torch.stack([c for _, c in outs], dim=1),
            "blocks_patch_mean": torch.stack([p.mean(dim=1) for p, _ in outs], dim=1)}


@register_feature("image", requires="encode_image (an image-text model)",
                  available=_has_method("encode_image"))
def _image(module: nn.Module, images: Tensor, cache: dict, **_: Any) -> dict[str, Tensor]:
    return {"image": module.encode_image(images)}


def default_image_feature(module: nn.Module) -> str:
    """The global image feature of a model: ``image`` (encode_image) for image-text models,
    else ``cls``."""
    return "image" if FEATURES["image"].available(module) else "cls"


def check_features(module: nn.Module, kinds: Sequence[str], needed_by: str) -> None:
    """UserError (one line) when ``module`` cannot produce one of ``kinds``."""
    for kind in kinds:
        if kind not in FEATURES:
            raise UserError(f"unknown feature kind '{kind}'; one of {', '.join(FEATURES)}")
        if not FEATURES[kind].available(module):
            raise UserError(f"{needed_by} needs {kind} features: {FEATURES[kind].requires}; "
                            f"{type(module).__name__} has none")


def progress_bar(total: int, desc: str | None, unit: str) -> Any:
    """Progress of an extraction or of head training on rank 0 (``desc`` None: none): a tqdm
    bar on a terminal, a plain line every ``DINOSYS_PROGRESS_EVERY_S`` seconds and one at the
    end in a log file (:func:`dinosys.progress.progress_bar`)."""
    from dinosys.progress import progress_bar as bar

    if desc is None or shard_layout()[0] != 0:
        return bar(total=total, disable=True)
    return bar(total=total, desc=desc, unit=unit, leave=False)


_unsharded = False
_group: Any = None  # the process group extraction shards over; None: the default (world) group


@contextmanager
def unsharded() -> Iterator[None]:
    """Evaluations inside run in this process alone, without collectives, as if it were the
    only rank: for a model that one rank evaluates (an export on its writer rank)."""
    global _unsharded
    outer, _unsharded = _unsharded, True
    try:
        yield
    finally:
        _unsharded = outer


@contextmanager
def sharded_over(group: Any) -> Iterator[None]:
    """Evaluations inside shard and gather over the ranks of process group ``group`` only
    (None: the whole world): for a model that only those ranks hold, so that every rank of the
    group evaluates that model and no other rank's features are mixed in. Every rank of
    ``group`` must enter it; ranks outside it take no part."""
    global _group
    outer, _group = _group, group
    try:
        yield
    finally:
        _group = outer


def shard_layout() -> tuple[int, int]:
    """(rank, world size) in the process group of :func:`sharded_over` (default: the world),
    (0, 1) without one or inside :func:`unsharded`."""
    if not _unsharded and dist.is_available() and dist.is_initialized():
        return dist.get_rank(_group), dist.get_world_size(_group)
    return 0, 1


@torch.no_grad()
def extract_features(module: nn.Module, images: ImageSet, kinds: Sequence[str],
                     batch_size: int = 256, device: torch.device | str = "cpu",
                     progress: str | None = None,
                     transform: Callable[[Tensor, int], Tensor] | None = None,
                     **options: Any) -> dict[str, Tensor]:
    """Features of every image of ``images``: ``{name: (n, ...) fp32 CPU tensor}`` in the
    set's order, the union of what the feature ``kinds`` produce (``options`` such as
    ``n_blocks`` go to each kind). Sharded over the ranks of the default process group (or of
    :func:`sharded_over`'s group) and gathered onto each of them.
    ``transform(batch, batch_index)`` (e.g. a seeded augmentation) is applied to each batch
    before the model. ``progress``: a bar with this title (rank 0).
    Inside :func:`dinosys.eval.feature_cache.shared_features` a request that earlier features
    of the same module and images cover is served from them (not with a ``transform``).
    """
    check_features(module, kinds, progress or "evaluation")
    from dinosys.eval.feature_cache import active_cache

    cache = active_cache() if transform is None else None
    if cache is not None:
        hit = cache.lookup(module, images, list(kinds), options)
        if hit is not None:
            log.info("%s: %d images, features shared with an earlier evaluation",
                     progress or "features", len(images))
            return hit
    rank, world = shard_layout()
    n_batches = images.n_batches(batch_size)
    mine = list(range(rank, n_batches, world))
    parts: dict[str, list[Tensor]] = {}
    bar = progress_bar(len(mine), progress, "batch")

    def features_of(batch: Tensor, index: int) -> dict[str, Tensor]:
        batch = batch.to(device, non_blocking=True)
        if transform is not None:
            batch = transform(batch, index)
        cache: dict = {}
        out: dict[str, Tensor] = {}
        for kind in kinds:
            out.update(FEATURES[kind].compute(module, batch, cache, **options))
        return out

    for index, batch in zip(mine, images.batches(batch_size, shard=(rank, world))):
        for name, value in features_of(batch, index).items():
            parts.setdefault(name, []).append(value.float().cpu())
        bar.update(1)
    bar.close()
    # every rank runs the same number of forward passes: a sharded (FSDP) model all-gathers
    # its weights in each one, so a rank with one batch fewer would leave the others waiting
    for _ in range(-(-n_batches // world) - len(mine)):
        if n_batches:
            features_of(next(iter(images.batches(batch_size, shard=(0, n_batches)))), 0)
    local = {name: torch.cat(chunks) for name, chunks in parts.items()}
    if world > 1:
        local = _gather(local, len(images), batch_size, rank, world, device)
    if cache is not None:
        cache.store(module, images, local)
    return local


def _gather(local: dict[str, Tensor], n: int, batch_size: int, rank: int, world: int,
            device: torch.device | str) -> dict[str, Tensor]:
    """All-gather each rank's batches and put them back in the set's order."""
    n_batches = -(-n // batch_size)

    def rows(r: int) -> list[int]:  # sizes of rank r's batches
        return [min(batch_size, n - b * batch_size) for b in range(r, n_batches, world)]

    counts = [sum(rows(r)) for r in range(world)]
    most = max(counts)
    # NCCL gathers device tensors; gloo CPU ones
    on = torch.device(device) if dist.get_backend(_group) == "nccl" else torch.device("cpu")
    shapes = _agree_shapes(local)
    out: dict[str, Tensor] = {}
    for name in sorted(shapes):
        mine = local.get(name, torch.zeros(0, *shapes[name]))
        padded = torch.zeros(most, *shapes[name], dtype=torch.float32, device=on)
        padded[:len(mine)] = mine.to(on)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=_group)
        per_rank = [g[:c].cpu().split(rows(r)) for r, (g, c) in
                    enumerate(zip(gathered, counts))]
        ordered = [per_rank[b % world][b // world] for b in range(n_batches)]
        out[name] = torch.cat(ordered)
    return out


def _agree_shapes(local: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Per-image shape of each feature (a rank without a batch learns them from the others)."""
    objs: list[Any] = [None] * dist.get_world_size(_group)
    dist.all_gather_object(objs, {k: tuple(v.shape[1:]) for k, v in local.items()}, group=_group)
    shapes: dict[str, tuple[int, ...]] = {}
    for obj in objs:
        shapes.update(obj)
    return shapes
