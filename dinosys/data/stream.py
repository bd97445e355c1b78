"""The generic training sample stream: deterministic, resumable, rank-split, bad data counted.

:class:`SampleLoader` reads the run's sources (``data:``, folders / lists / shards, weighted) in a
global order fixed by (seed, epoch) and hands every sample, with every member (image, caption,
label, metadata: :class:`~dinosys.data.sources.Sample`), to the task's :class:`BatchTransform`,
which turns a batch's samples into tensors (multi-crop + masks for SSL:
:mod:`dinosys.data.multicrop`; image + text for CLIP; ...).

Order: :class:`~dinosys.data.order.EpochOrder` fixes every epoch's global sample order from
(seed, epoch). Global batch ``t`` of an epoch is positions ``[c0 + t*G, c0 + (t+1)*G)`` with
``G = world_size * batch_size`` and ``c0`` the position the epoch was (re)started at; rank ``r``
takes the ``r``-th slice of ``batch_size``. So every rank yields exactly
``(len(order) - c0) // G`` batches per epoch whatever the shard counts (the tail that does not
fill a global batch is dropped, differently each epoch), and DataLoader worker ``k`` builds the
batches ``k, k + num_workers, ...`` which the DataLoader returns in order.

Position state: ``{"epoch", "consumed"}`` counts the samples of the epoch consumed by all ranks
together (identical on every rank). Resuming at the same world size continues with the next
unseen sample. If the world size or batch size changes, the remaining samples of the current
epoch (``[consumed, len)``) are re-split across the new ranks: still no repeats and no gaps.

Randomness: a sample's transform gets ``default_rng([seed, epoch, position])`` and a batch's
:class:`BatchContext` the seed, epoch and first position, so results do not depend on the number
of workers. Bad samples (see :mod:`dinosys.data.decode`) are replaced by a deterministic
pseudo-random other sample of the same epoch, counted by reason and logged.
"""

from __future__ import annotations

import logging
import signal
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dinosys.config import ConfigError, Section, check_bounds, check_choice, check_range
from dinosys.data.decode import BadImageError
from dinosys.data.order import EpochOrder
from dinosys.data.sources import DataSourceConfig, Sample, build_source
from dinosys.errors import UserError

logger = logging.getLogger(__name__)

STATE_VERSION = 1
BAD_FRACTION_MIN_SAMPLES = 64  # data.max_bad_fraction is judged from this many samples on
MAX_REPLACEMENTS = 32
_LOG_FIRST_N_PER_REASON = 10
_STREAM_REPLACE = 21


@dataclass
class DataConfig(Section):
    """Training input pipeline."""

    # training data: [{path: DIR | LIST.txt | SHARDS, weight: w}, ...]
    sources: list[DataSourceConfig] = field(default_factory=list)
    # images per rank per micro-batch (global batch: x ranks x grad_accum)
    batch_size_per_gpu: int = 64
    num_workers: int = 8  # DataLoader worker processes per rank
    shuffle_buffer: int = 2000  # samples per shuffle window (shards shuffled, then samples within)
    decoder: str = "auto"  # auto, simplejpeg, pil
    max_image_pixels: int = 89_478_485  # Pillow's decompression-bomb limit
    gpu_augment: bool = False  # colour/blur/solarize on the training device (data/gpu_augment.py)
    # a missing source or kNN folder inside this root (<root>/mnist/train...) gets the embedded
    # data built there; a missing path anywhere else is "not found"
    builtin_root: str = "data/builtin"
    # stop with an error when more than this fraction of the samples read so far (at least
    # BAD_FRACTION_MIN_SAMPLES) was unreadable: damaged shards, corrupt images, missing files
    max_bad_fraction: float = 0.1

    def validate(self) -> None:
        check_choice(self.decoder, ("auto", "simplejpeg", "pil"), "data.decoder")
        if self.batch_size_per_gpu < 1:
            raise ConfigError("config key 'data.batch_size_per_gpu': must be >= 1")
        check_range(self.max_bad_fraction, "data.max_bad_fraction", 0.0, 1.0)
        check_bounds(self, "data", {"num_workers": (0, None), "shuffle_buffer": (0, None),
                                    "max_image_pixels": (1, None)})


@dataclass(frozen=True)
class BatchContext:
    """Where a batch sits in the stream: seed, epoch and this rank's first global position."""

    seed: int
    epoch: int
    first: int
    shared: bool  # built in a DataLoader worker: tensors go to shared memory


class BatchTransform(ABC):
    """A task's per-sample transform and collation. Must be picklable (DataLoader workers).

    For each batch the stream calls :meth:`start`, then :meth:`add` for sample slots
    ``0 .. batch_size-1`` (again for the same slot with a replacement sample when ``add`` raised
    :class:`~dinosys.data.decode.BadImageError`, so ``add`` must overwrite the slot), then
    :meth:`finish`, which returns the batch (a dict with ``"batch_size"`` by convention).
    """

    @abstractmethod
    def start(self, batch_size: int, ctx: BatchContext) -> Any:
        """Fresh per-batch state (e.g. preallocated tensors)."""

    @abstractmethod
    def add(self, state: Any, slot: int, sample: Sample, rng: np.random.Generator) -> None:
        """Transform ``sample`` into slot ``slot`` of ``state``; ``rng`` is the sample's own
        generator. Raise BadImageError for unusable data (the sample is replaced)."""

    @abstractmethod
    def finish(self, state: Any, ctx: BatchContext) -> dict[str, Any]:
        """The batch built from ``state``."""


class SampleStream(IterableDataset):
    """Yields (batch dict, bad-sample events, (epoch, consumed after this batch)) forever."""

    def __init__(self, data: DataConfig, seed: int, rank: int, world_size: int,
                 transform: BatchTransform, sources: list, weights: list[float],
                 start_epoch: int, start_consumed: int) -> None:
        super().__init__()
        self.data, self.seed, self.rank, self.world_size = data, seed, rank, world_size
        self.transform = transform
        self.batch_size = data.batch_size_per_gpu
        self.sources, self.weights = sources, weights
        self.start_epoch, self.start_consumed = start_epoch, start_consumed
        self._orders: dict[int, EpochOrder] = {}

    def order(self, epoch: int) -> EpochOrder:
        """The (cached) global order of ``epoch``."""
        if epoch not in self._orders:
            if len(self._orders) > 1:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = EpochOrder(self.sources, self.weights, self.seed, epoch,
                                             max(1, self.data.shuffle_buffer))
        return self._orders[epoch]

    def schedule(self) -> Iterator[tuple[int, int, int]]:
        """Global batches from the start position: (epoch, first position, consumed after)."""
        g = self.world_size * self.batch_size
        epoch, consumed = self.start_epoch, self.start_consumed
        while True:
            n = len(self.order(epoch))
            if n < g:
                raise UserError(f"an epoch has {n} samples, fewer than one global batch of {g} "
                                "(world size x data.batch_size_per_gpu): add data or lower it")
            while consumed + g <= n:
                yield epoch, consumed, consumed + g
                consumed += g
            epoch, consumed = epoch + 1, 0

    def _load(self, order: EpochOrder, epoch: int, position: int, events: list, state: Any,
              slot: int) -> None:
        """Transform the sample at ``position`` (or its replacement) into ``slot``."""
        index = position
        for attempt in range(MAX_REPLACEMENTS + 1):
            src, item = order[index]
            where = f"{self.sources[src].name}#{item}"
            try:
                sample = self.sources[src].read(item)
                where = sample.where
                rng = np.random.default_rng([self.seed, epoch, position])
                self.transform.add(state, slot, sample, rng)
                return
            except BadImageError as exc:
                events.append((exc.reason, where, exc.detail))
            except Exception as exc:  # a decoder bug on odd data must not stop training
                events.append(("decode_error", where, f"{type(exc).__name__}: {exc}"[:120]))
            rng = np.random.default_rng([self.seed, epoch, _STREAM_REPLACE, position, attempt])
            index = int(rng.integers(len(order)))
        raise UserError(f"{MAX_REPLACEMENTS + 1} bad samples in a row around position {position} "
                        f"of epoch {epoch}: is the data readable? last: {events[-1]}")

    def make_batch(self, epoch: int, first: int) -> tuple[dict, list]:
        """The batch of this rank for the global batch starting at ``first``."""
        order = self.order(epoch)
        begin = first + self.rank * self.batch_size
        events: list = []
        ctx = BatchContext(self.seed, epoch, begin, shared=get_worker_info() is not None)
        state = self.transform.start(self.batch_size, ctx)
        for slot, position in enumerate(range(begin, begin + self.batch_size)):
            self._load(order, epoch, position, events, state, slot)
        return self.transform.finish(state, ctx), events

    def __iter__(self) -> Iterator[tuple[dict, list, tuple[int, int]]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            for i, (epoch, first, after) in enumerate(self.schedule()):
                if i % n_workers != worker:
                    continue
                batch, events = self.make_batch(epoch, first)
                yield batch, events, (epoch, after)
        except UserError as exc:  # hand it to the main process as one line, not a worker trace
            yield None, [("fatal", "", str(exc))], (-1, -1)


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader worker start-up: ignore SIGUSR2, the trainer's preemption signal.

    Slurm's ``--signal=USR2@T`` (what launch/submit.py asks for) reaches every process of the job
    step, and ``kill -USR2 -- -PGID`` the whole group: a worker killed by it would crash the run
    instead of letting the main process save its preemption checkpoint. SIGTERM keeps its default
    action because multiprocessing ends workers with it at exit.
    """
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class SampleLoader:
    """Infinite iterable of batch dicts with a resumable position (see the module docstring).

    ``state_dict()`` -> {"version", "epoch", "consumed", "seed", "world_size", "batch_size",
    "samples_per_epoch", "bad"}: the position after the last batch handed out and this rank's
    bad-sample counts. ``load_state_dict`` before iterating resumes there (the counts continue).
    ``stats()`` -> bad-sample counts by reason.
    """

    def __init__(self, data: DataConfig, seed: int, rank: int, world_size: int,
                 transform: BatchTransform) -> None:
        if not data.sources:
            raise UserError("data.sources is empty: give at least one image folder, .txt list "
                            "or shard pattern (e.g. data.sources=[{path: DIR}])")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.data, self.seed, self.rank, self.world_size = data, seed, rank, world_size
        self.transform = transform
        self.batch_size = data.batch_size_per_gpu
        self.sources = [build_source(s) for s in data.sources]
        self.weights = [float(s.weight) for s in data.sources]
        if any(w < 0 for w in self.weights) or not any(w > 0 for w in self.weights):
            raise UserError("data.sources weights must be >= 0 with at least one > 0")
        self.epoch, self.consumed = 0, 0
        self._bad: Counter[str] = Counter()
        self._recent_bad: list[str] = []
        self._batches = 0
        self._probe = self._stream(0, 0)
        if self.samples_per_epoch < world_size * self.batch_size:
            raise UserError(f"an epoch has {self.samples_per_epoch} samples, fewer than one global "
                            f"batch of {world_size * self.batch_size} (world size x "
                            "data.batch_size_per_gpu): add data or lower the batch size")
        logger.info("data: %s", ", ".join(f"{s.name} ({len(s)} samples, weight {w:g})"
                                           for s, w in zip(self.sources, self.weights)))

    def _stream(self, epoch: int, consumed: int) -> SampleStream:
        return SampleStream(self.data, self.seed, self.rank, self.world_size, self.transform,
                            self.sources, self.weights, epoch, consumed)

    @property
    def samples_per_epoch(self) -> int:
        """Samples in the current epoch's order (all ranks together)."""
        return len(self._probe.order(self.epoch))

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields in a full epoch."""
        return self.samples_per_epoch // (self.world_size * self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch is the first unseen one."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "consumed": self.consumed,
                "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "samples_per_epoch": self.samples_per_epoch,
                "bad": dict(self._bad), "batches": self._batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (see the module docstring for a changed world size)."""
        if int(state.get("version", 0)) != STATE_VERSION:
            raise UserError(f"data loader state version {state.get('version')} is not "
                            f"{STATE_VERSION}: cannot resume the data position")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._bad = Counter({str(k): int(v) for k, v in (state.get("bad") or {}).items()})
        self._batches = int(state.get("batches", 0))
        if int(state.get("seed", self.seed)) != self.seed:
            logger.warning("data state was saved with seed %s, now %s: the order changes",
                           state.get("seed"), self.seed)
        n = self.samples_per_epoch
        if int(state.get("samples_per_epoch", n)) != n:
            logger.warning("epoch %d had %s samples when saved, now %d (data changed): "
                           "continuing at sample %d of the new order",
                           self.epoch, state.get("samples_per_epoch"), n, self.consumed)
        old_g = int(state.get("world_size", self.world_size)) * int(state.get("batch_size",
                                                                              self.batch_size))
        if old_g != self.world_size * self.batch_size:
            logger.info("global batch changed (%d -> %d): the rest of epoch %d (%d samples) is "
                        "re-split across %d ranks", old_g, self.world_size * self.batch_size,
                        self.epoch, max(0, n - self.consumed), self.world_size)
        if self.consumed + self.world_size * self.batch_size > n:
            self.epoch, self.consumed = self.epoch + 1, 0

    def stats(self) -> dict[str, Any]:
        """Bad-sample counts by reason, total, batches yielded and the last few bad samples."""
        return {"bad": dict(self._bad), "bad_total": int(sum(self._bad.values())),
                "batches": self._batches, "recent_bad": list(self._recent_bad)}

    def _record(self, events: list) -> None:
        for reason, where, detail in events:
            self._bad[reason] += 1
            self._recent_bad = (self._recent_bad + [f"{where}: {reason}"])[-10:]
            n = self._bad[reason]
            if n <= _LOG_FIRST_N_PER_REASON or n % 1000 == 0:
                logger.warning("skipped bad sample (%s, %d so far) %s %s", reason, n, where, detail)

    def _check_bad_fraction(self) -> None:
        """UserError when too large a share of the samples read so far was unreadable."""
        bad = sum(self._bad.values())
        read = bad + self._batches * self.batch_size
        limit = self.data.max_bad_fraction
        if read >= BAD_FRACTION_MIN_SAMPLES and bad > limit * read:
            reasons = ", ".join(f"{r}: {n}" for r, n in self._bad.most_common())
            raise UserError(f"{bad} of the {read} samples read so far were unreadable ({reasons}; "
                            f"e.g. {self._recent_bad[-1]}), more than data.max_bad_fraction="
                            f"{limit:g}: repair or remove the damaged data, or raise the limit")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self._stream(self.epoch, self.consumed)
        workers = self.data.num_workers
        if workers > 0:
            # a private generator: without it the worker base seed is drawn from the global
            # torch RNG, which shifts the model's RNG stream (drop path) after a resume
            seed = np.random.SeedSequence([self.seed, self.rank, self.epoch, self.consumed])
            generator = torch.Generator().manual_seed(int(seed.generate_state(1)[0]))
            it = iter(DataLoader(stream, batch_size=None, num_workers=workers,
                                 pin_memory=torch.cuda.is_available(), prefetch_factor=2,
                                 persistent_workers=False, generator=generator,
                                 worker_init_fn=ignore_preemption_signals))
        else:
            it = iter(stream)
        try:
            for batch, events, (epoch, consumed) in it:
                if batch is None:
                    raise UserError(events[0][2])
                self._record(events)
                self.epoch, self.consumed = epoch, consumed
                self._batches += 1
                self._check_bad_fraction()
                yield batch
        finally:
            del it  # stop the workers now, not when a traceback holding this frame is collected
