"""Students on rank subgroups, one teacher forward per global batch (the DINOv3 pattern).

Every rank loads its slice of the global batch (``b`` images, rank ``r`` holds images
``[r*b, (r+1)*b)``) and runs the teacher on it: the teacher forward is paid once for the whole
global batch ``G = world * b``, wherever the students are. Then, per step, ``exchange`` sends
crops and teacher outputs to the students' ranks:

- **subgroups** (every student has a rank range, the ranges partition the world): student ``s``
  on ``n_s`` ranks gets ``G / n_s`` images per rank: its ``k``-th rank holds images
  ``[k*G/n_s, (k+1)*G/n_s)``. One ``all_to_all`` per tensor moves each image from the rank that
  loaded it to the rank of each student that trains on it (no rank receives more than it
  trains on). Every student sees the whole global batch.
- **in turn** (no ranges: every student on every rank): each rank keeps its own slice and trains
  the students one after the other on the same teacher outputs; nothing is exchanged.

``parse_rank_ranges`` validates ranges before anything starts (one-line UserError).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from dinosys.errors import UserError


def parse_rank_ranges(ranges: Mapping[str, Sequence[int] | None],
                      world_size: int) -> dict[str, range]:
    """Per student, its ranks: ``[first, last]`` (inclusive) per student, or None everywhere.

    None for every student: each student on every rank (trained in turn). Otherwise each student
    needs a range, the ranges must not overlap and must cover ``range(world_size)`` exactly.
    """
    if not ranges:
        raise UserError("distillation needs at least one student")
    given = {name: r for name, r in ranges.items() if r is not None}
    if not given:
        return {name: range(world_size) for name in ranges}
    if len(given) != len(ranges):
        missing = sorted(set(ranges) - set(given))
        raise UserError(f"student rank ranges: set 'ranks' for every student or for none "
                        f"(missing for {missing})")
    out: dict[str, range] = {}
    for name, spec in given.items():
        values = list(spec)
        if len(values) != 2 or not all(isinstance(v, int) for v in values):
            raise UserError(f"student '{name}': ranks must be [first, last], got {values}")
        first, last = values
        if not 0 <= first <= last < world_size:
            raise UserError(f"student '{name}': ranks [{first}, {last}] are outside the "
                            f"{world_size} ranks of this job [0, {world_size - 1}]")
        out[name] = range(first, last + 1)
    owner: dict[int, str] = {}
    for name, ranks in sorted(out.items(), key=lambda kv: kv[1].start):
        for r in ranks:
            if r in owner:
                raise UserError(f"student rank ranges overlap: rank {r} is in both "
                                f"'{owner[r]}' and '{name}'")
            owner[r] = name
    uncovered = [r for r in range(world_size) if r not in owner]
    if uncovered:
        raise UserError(f"student rank ranges do not cover the world ({world_size} ranks): "
                        f"ranks {uncovered} have no student")
    return out


def _overlap(a: range, b: range) -> int:
    return max(0, min(a.stop, b.stop) - max(a.start, b.start))


@dataclass
class RankLayout:
    """Which students this rank trains and how images move to them (see the module doc)."""

    ranges: dict[str, range]
    world_size: int
    rank: int
    groups: dict[str, object | None] = field(default_factory=dict)  # name -> ProcessGroup

    @property
    def in_turn(self) -> bool:
        """Every student on every rank (no exchange)."""
        return all(len(r) == self.world_size for r in self.ranges.values())

    @property
    def local_students(self) -> list[str]:
        """The students this rank trains, in configuration order."""
        return [name for name, r in self.ranges.items() if self.rank in r]

    def images_per_rank(self, name: str, global_batch: int) -> int:
        """How many images of each global batch a rank of student ``name`` trains on."""
        n = len(self.ranges[name])
        if global_batch % n:
            raise UserError(f"global batch {global_batch} does not split evenly over the {n} "
                            f"ranks of student '{name}': choose a batch size that does")
        return global_batch // n

    def student_chunk(self, name: str, rank: int, global_batch: int) -> range:
        """Images of the global batch that ``rank`` (a rank of ``name``) trains on."""
        c = self.images_per_rank(name, global_batch)
        k = rank - self.ranges[name].start
        return range(k * c, (k + 1) * c)

    def _owner(self) -> dict[int, str]:
        return {r: name for name, ranks in self.ranges.items() for r in ranks}

    def send_rows(self, per_rank: int) -> list[range]:
        """Per peer rank, the rows of this rank's slice it needs (local row indices)."""
        g = per_rank * self.world_size
        owner = self._owner()
        start = self.rank * per_rank
        out = []
        for j in range(self.world_size):
            chunk = self.student_chunk(owner[j], j, g)
            lo, hi = max(chunk.start, start), min(chunk.stop, start + per_rank)
            out.append(range(lo - start, max(lo, hi) - start))
        return out

    def split_counts(self, per_rank: int) -> tuple[list[int], list[int]]:
        """``(send, recv)`` image counts per peer rank for one exchange (subgroup mode)."""
        g = per_rank * self.world_size
        send = [len(r) for r in self.send_rows(per_rank)]
        wanted = self.student_chunk(self._owner()[self.rank], self.rank, g)
        recv = [_overlap(range(j * per_rank, (j + 1) * per_rank), wanted)
                for j in range(self.world_size)]
        return send, recv

    def exchange(self, x: Tensor) -> Tensor:
        """This rank's (b, ...) image-major rows -> its student's (G / n_s, ...) rows.

        Collective over the world in subgroup mode (every rank calls it, in the same order).
        """
        if self.in_turn or self.world_size == 1:
            return x
        send, recv = self.split_counts(x.shape[0])
        index = torch.cat([torch.arange(r.start, r.stop) for r in self.send_rows(x.shape[0])])
        is_bool = x.dtype == torch.bool
        rows = (x.to(torch.uint8) if is_bool else x).reshape(x.shape[0], -1)
        rows = rows.index_select(0, index.to(rows.device)).contiguous()
        out = rows.new_empty((sum(recv), rows.shape[1]))
        dist.all_to_all_single(out, rows, output_split_sizes=recv, input_split_sizes=send)
        out = out.reshape(sum(recv), *x.shape[1:])
        return out.bool() if is_bool else out


def build_layout(ranges: Mapping[str, Sequence[int] | None], world_size: int,
                 rank: int) -> RankLayout:
    """Validate ``ranges`` and create one process group per student (collective on every rank).

    In-turn mode uses the default group for every student (``None``).
    """
    layout = RankLayout(parse_rank_ranges(ranges, world_size), world_size, rank)
    for name, ranks in layout.ranges.items():
        if len(ranks) == world_size or world_size == 1:
            layout.groups[name] = None
        else:
            # every rank creates every group, in the same order (torch.distributed's contract)
            group = dist.new_group(list(ranks))
            if rank in ranks:
                layout.groups[name] = group
    return layout


def to_image_major(x: Tensor, n_crops: int) -> Tensor:
    """Crop-major (n_crops * b, ...) -> image-major (b, n_crops, ...)."""
    if x.numel() == 0 or n_crops == 0:
        return x
    return x.reshape(n_crops, x.shape[0] // n_crops, *x.shape[1:]).transpose(0, 1).contiguous()


def to_crop_major(x: Tensor) -> Tensor:
    """Image-major (b, n_crops, ...) -> crop-major (n_crops * b, ...)."""
    if x.numel() == 0:
        return x
    return x.transpose(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()
