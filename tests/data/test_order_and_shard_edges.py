"""Edge cases of the epoch order and of shard reading that the main tests pass without noticing:
the shard order itself must change with the epoch (not only the order inside each window), a
fractional weight must pick a different subset each epoch, and a stale sizes.json must surface as
a read error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import jpeg_bytes, tiny_config, write_shard

from dinosys.data.decode import BadImageError
from dinosys.data.multicrop import build_ssl_loader
from dinosys.data.order import EpochOrder
from dinosys.data.sources import ShardSource


class _Shards:
    def __init__(self, sizes: list[int]) -> None:
        self.unit_sizes = np.asarray(sizes)
        self.shuffle_items = False


def test_shard_order_differs_between_epochs() -> None:
    shards = _Shards([10] * 12)
    orders = [EpochOrder([shards], [1.0], seed=3, epoch=e, window_samples=40) for e in range(3)]
    units = [o.unit_start.tolist() for o in orders]
    for u in units:
        assert sorted(u) == list(range(0, 120, 10))  # every shard once per epoch
    assert units[0] != units[1] and units[1] != units[2] and units[0] != units[2]
    same = EpochOrder([shards], [1.0], seed=3, epoch=1, window_samples=40)
    assert same.unit_start.tolist() == units[1]  # a function of (seed, epoch) only


def test_samples_inside_a_window_are_reshuffled_every_epoch() -> None:
    """One shard, one window: the unit order cannot change, so only the window shuffle can."""
    orders = [[EpochOrder([_Shards([50])], [1.0], seed=0, epoch=e, window_samples=64)[p][1]
               for p in range(50)] for e in range(3)]
    assert all(sorted(o) == list(range(50)) for o in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]


def test_half_weighted_source_picks_different_halves_in_different_epochs() -> None:
    shards = _Shards([10] * 16)
    halves = [frozenset(EpochOrder([shards], [0.5], seed=0, epoch=e, window_samples=16)
                        .unit_start.tolist()) for e in range(4)]
    assert all(len(h) == 8 for h in halves)
    assert len(set(halves)) == 4  # a new half every epoch
    assert set().union(*halves) != halves[0]


def test_stale_sizes_json_is_a_read_error(tmp_path: Path, photos: list[np.ndarray]) -> None:
    """sizes.json says 2 samples, the shard holds 1: reading the missing one is a read error
    (counted and skipped by the loader), not a crash or another reason."""
    write_shard(tmp_path / "000000.tar",
                [{"__key__": "only", "jpg": jpeg_bytes(photos[0][:32, :32]), "cls": b"3"}])
    (tmp_path / "sizes.json").write_text(json.dumps({"000000.tar": 2}))
    src = ShardSource("stale", str(tmp_path / "000000.tar"))
    assert len(src) == 2  # the count comes from sizes.json
    assert src.read(0).label == 3
    with pytest.raises(BadImageError) as info:
        src.read(1)
    assert info.value.reason == "read_error"
    assert "stale sizes.json" in str(info.value)


def test_augmentation_of_a_position_changes_with_the_epoch(tmp_path: Path,
                                                           builtin_data: Path) -> None:
    """Eight copies of one photo: the image at every position is the same in every epoch, so
    only the per-(epoch, position) augmentation randomness can make the crops differ."""
    photo = builtin_data / "photos" / "chelsea.png"
    listing = tmp_path / "same.txt"
    listing.write_text(f"{photo}\n" * 8)
    cfg = tiny_config([(str(listing), 1.0)], batch_size=4)
    it = iter(build_ssl_loader(cfg, 0, 1, patch_size=16))
    epoch0, epoch1 = [next(it) for _ in range(2)], [next(it) for _ in range(2)]
    for a, b in zip(epoch0, epoch1):
        for key in ("global_crops", "local_crops"):
            for i in range(len(a[key])):
                assert not torch.equal(a[key][i], b[key][i]), (key, i)
    again = iter(build_ssl_loader(cfg, 0, 1, patch_size=16))
    assert torch.equal(next(again)["global_crops"], epoch0[0]["global_crops"])  # deterministic


def _shards_cfg(id_shards: Path, batch_size: int):  # noqa: ANN202 - a TrainConfig
    return tiny_config([(str(id_shards / "{000000..000002}.tar"), 1.0)], batch_size=batch_size)


def test_an_epoch_that_divides_into_batches_uses_every_batch(id_shards: Path) -> None:
    """25 samples, batches of 5: epoch 0 is exactly 5 batches holding each sample once."""
    loader = build_ssl_loader(_shards_cfg(id_shards, 5), 0, 1, patch_size=16)
    it = iter(loader)
    epoch0 = [next(it) for _ in range(5)]
    assert sorted(int(v) for b in epoch0 for v in b["labels"]) == list(range(25))
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["consumed"] == 25
    next(it)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["consumed"] == 5


def test_resume_one_batch_before_the_end_of_an_epoch(id_shards: Path) -> None:
    """A state with exactly one global batch left resumes with that batch, not the next epoch."""
    cfg = _shards_cfg(id_shards, 5)
    reference = iter(build_ssl_loader(cfg, 0, 1, patch_size=16))
    expected = [next(reference)["labels"].tolist() for _ in range(6)]
    first = build_ssl_loader(cfg, 0, 1, patch_size=16)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    assert (state["epoch"], state["consumed"]) == (0, 20)
    resumed = build_ssl_loader(cfg, 0, 1, patch_size=16)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    it = iter(resumed)
    assert [next(it)["labels"].tolist() for _ in range(2)] == expected[4:]
