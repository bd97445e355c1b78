"""Features and decoded images shared by the evaluations of one suite.

Within :func:`shared_features` (``dinosys eval suite`` opens it around its entries),
:func:`dinosys.eval.features.extract_features` serves a request from features already extracted
for the same module and image set, and :func:`dinosys.eval.images.load_image_folder` returns a
folder already decoded with the same preprocessing. Before the first entry runs, the suite asks
each evaluator which features it will need (the ``features`` hook of
:func:`dinosys.eval.registry.register_evaluator`, a list of :class:`FeatureNeed`), merges them
per folder and extracts each folder once: kNN's class tokens and the linear probe's class tokens
of the last 4 blocks then come from one forward pass per image.

A stored feature serves a narrower request (:data:`SERVE`): ``cls`` is the last entry of
``blocks_cls`` (both are the class token after the final norm), ``patch_mean`` the last of
``blocks_patch_mean``, and ``blocks`` of the last ``n`` blocks a slice of more blocks.
Augmented extractions (a ``transform``) are never cached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn


@dataclass
class FeatureNeed:
    """Features an evaluation will extract from one image folder."""

    folder: str
    kinds: list[str]
    options: dict[str, int] = field(default_factory=dict)  # sizes, e.g. n_blocks (max wins)
    batch_size: int = 256


def _cls(stored: dict[str, Tensor], options: dict) -> dict[str, Tensor] | None:
    if "cls" in stored:
        return {"cls": stored["cls"]}
    if "blocks_cls" in stored:
        return {"cls": stored["blocks_cls"][:, -1]}
    return None


def _patch_mean(stored: dict[str, Tensor], options: dict) -> dict[str, Tensor] | None:
    if "patch_mean" in stored:
        return {"patch_mean": stored["patch_mean"]}
    if "blocks_patch_mean" in stored:
        return {"patch_mean": stored["blocks_patch_mean"][:, -1]}
    return None


def _blocks(stored: dict[str, Tensor], options: dict) -> dict[str, Tensor] | None:
    n = int(options.get("n_blocks", 1))
    if "blocks_cls" not in stored or stored["blocks_cls"].shape[1] < n:
        return None
    return {"blocks_cls": stored["blocks_cls"][:, -n:],
            "blocks_patch_mean": stored["blocks_patch_mean"][:, -n:]}


def _image(stored: dict[str, Tensor], options: dict) -> dict[str, Tensor] | None:
    return {"image": stored["image"]} if "image" in stored else None


# a kind the other one's tensors serve (one forward pass instead of two)
SUBSUMED_BY = {"cls": "blocks", "patch_mean": "blocks"}
# kind -> the request served from what is stored (None: extract)
SERVE: dict[str, Callable[[dict[str, Tensor], dict], dict[str, Tensor] | None]] = {
    "cls": _cls, "patch_mean": _patch_mean, "blocks": _blocks, "image": _image}


def _images_key(images: Any) -> tuple:
    return (tuple(str(p) for p, _ in images.samples), images.size, tuple(images.mean),
            tuple(images.std))


class FeatureCache:
    """Extracted features per (module, image set) and decoded folders per preprocessing."""

    def __init__(self) -> None:
        self.features: dict[tuple, dict[str, Tensor]] = {}
        self.folders: dict[tuple, Any] = {}
        self.modules: dict[int, nn.Module] = {}  # alive while their features are kept (ids)
        self.passes = 0  # extractions that ran the model
        self.served = 0  # requests answered from stored features

    def lookup(self, module: nn.Module, images: Any, kinds: list[str], options: dict
               ) -> dict[str, Tensor] | None:
        """The features ``kinds`` of ``images``, when what is stored covers all of them."""
        stored = self.features.get((id(module), _images_key(images)))
        if stored is None:
            return None
        out: dict[str, Tensor] = {}
        for kind in kinds:
            served = SERVE[kind](stored, options) if kind in SERVE else None
            if served is None:
                return None
            out.update(served)
        self.served += 1
        return out

    def store(self, module: nn.Module, images: Any, feats: dict[str, Tensor]) -> None:
        """Keep ``feats`` (beside anything stored for the same module and images)."""
        self.passes += 1
        self.modules[id(module)] = module
        self.features.setdefault((id(module), _images_key(images)), {}).update(feats)

    def forget_features(self) -> None:
        """Drop the features (the weights are about to change), keep the decoded folders."""
        self.features.clear()
        self.modules.clear()

    def folder(self, root: Path, size: int, mean: tuple, std: tuple,
               load: Callable[[], Any]) -> Any:
        """The image set of ``root`` with this preprocessing, loaded once."""
        key = (str(Path(root).resolve()), size, tuple(mean), tuple(std))
        if key not in self.folders:
            self.folders[key] = load()
        return self.folders[key]


_active: FeatureCache | None = None


def active_cache() -> FeatureCache | None:
    """The cache of the enclosing :func:`shared_features` block, if any."""
    return _active


@contextmanager
def shared_features(cache: FeatureCache | None = None) -> Iterator[FeatureCache]:
    """Share extracted features and decoded folders between evaluations inside the block
    (in ``cache``, e.g. one that keeps decoded folders from an earlier block; else a new one)."""
    global _active
    outer, _active = _active, cache if cache is not None else FeatureCache()
    try:
        yield _active
    finally:
        _active = outer


def merge_needs(needs: list[FeatureNeed]) -> list[FeatureNeed]:
    """One need per folder: the union of the kinds (less those another one serves), the
    largest of each size option, the first batch size."""
    merged: dict[str, FeatureNeed] = {}
    for need in needs:
        key = str(Path(need.folder).resolve())
        if key not in merged:
            merged[key] = FeatureNeed(need.folder, list(need.kinds), dict(need.options),
                                      need.batch_size)
            continue
        into = merged[key]
        into.kinds += [k for k in need.kinds if k not in into.kinds]
        for name, value in need.options.items():
            into.options[name] = max(into.options.get(name, value), value)
    for need in merged.values():
        need.kinds = [k for k in need.kinds if SUBSUMED_BY.get(k) not in need.kinds]
    return list(merged.values())
