"""The deterministic global sample order of one epoch: a function of (seed, epoch, sources) only.

Each source's units (shards, or blocks of a per-epoch file permutation) are repeated by the
source's weight (weight 2: every unit twice; 0.5: a random half of the units), all units are
shuffled together, consecutive units are grouped into windows of at least ``window_samples``
samples and ``min_window_units`` units (so even big shards mix with others), and the samples
inside each window are shuffled. Position ``p`` in ``[0, len(order))``
maps to (source, item). Memory is O(units) plus the windows in use, so a resumable position is
just "samples consumed", and every rank/worker computes the same order without communication.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

_STREAM_UNITS, _STREAM_ITEMS, _STREAM_WINDOW = 11, 12, 13


class EpochOrder:
    """Global sample order for one epoch over ``sources`` (objects with ``unit_sizes``)."""

    def __init__(self, sources: Sequence, weights: Sequence[float], seed: int, epoch: int,
                 window_samples: int, min_window_units: int = 8) -> None:
        self.seed, self.epoch = seed, epoch
        rng = np.random.default_rng([seed, epoch, _STREAM_UNITS])
        self._item_orders: list[np.ndarray | None] = []
        unit_src, unit_start, unit_len = [], [], []
        for s, (source, weight) in enumerate(zip(sources, weights)):
            sizes = np.asarray(source.unit_sizes, dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            if source.shuffle_items:
                item_rng = np.random.default_rng([seed, epoch, _STREAM_ITEMS, s])
                self._item_orders.append(item_rng.permutation(int(sizes.sum())))
            else:
                self._item_orders.append(None)
            whole, frac = int(weight), weight - int(weight)
            chosen = [np.arange(len(sizes))] * whole
            n_extra = int(round(frac * len(sizes)))
            if n_extra:
                chosen.append(np.sort(rng.choice(len(sizes), n_extra, replace=False)))
            for units in chosen:
                unit_src.append(np.full(len(units), s, dtype=np.int64))
                unit_start.append(starts[units])
                unit_len.append(sizes[units])
        if not unit_src:
            raise ValueError("no data: every source has weight 0")
        src = np.concatenate(unit_src)
        start = np.concatenate(unit_start)
        length = np.concatenate(unit_len)
        perm = rng.permutation(len(src))
        self.unit_src, self.unit_start, self.unit_len = src[perm], start[perm], length[perm]
        # windows: consecutive units until at least window_samples samples and min_window_units
        bounds, acc = [0], 0
        for i, n in enumerate(self.unit_len.tolist()):
            acc += n
            if acc >= window_samples and i + 1 - bounds[-1] >= min_window_units:
                bounds.append(i + 1)
                acc = 0
        if bounds[-1] != len(self.unit_len):
            bounds.append(len(self.unit_len))
        self.window_units = np.asarray(bounds, dtype=np.int64)
        unit_cum = np.concatenate([[0], np.cumsum(self.unit_len)])
        self.window_starts = unit_cum[self.window_units]
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.window_starts[-1])

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._cache.get(w)
        if hit is not None:
            self._cache.move_to_end(w)
            return hit
        srcs, items = [], []
        for u in range(int(self.window_units[w]), int(self.window_units[w + 1])):
            s, st, n = int(self.unit_src[u]), int(self.unit_start[u]), int(self.unit_len[u])
            order = self._item_orders[s]
            idx = np.arange(st, st + n) if order is None else order[st:st + n]
            srcs.append(np.full(n, s, dtype=np.int64))
            items.append(idx)
        src, item = np.concatenate(srcs), np.concatenate(items)
        rng = np.random.default_rng([self.seed, self.epoch, _STREAM_WINDOW, w])
        perm = rng.permutation(len(src))
        out = (src[perm], item[perm])
        self._cache[w] = out
        if len(self._cache) > 4:
            self._cache.popitem(last=False)
        return out

    def __getitem__(self, position: int) -> tuple[int, int]:
        """(source index, item index) at ``position`` of this epoch's order."""
        if not 0 <= position < len(self):
            raise IndexError(position)
        w = int(np.searchsorted(self.window_starts, position, side="right")) - 1
        src, item = self._window(w)
        off = position - int(self.window_starts[w])
        return int(src[off]), int(item[off])
