"""The streaming SSL loader: determinism, resume continuity, rank splitting, bad data."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from data_helpers import tiny_config, write_shard

from dinosys.data.multicrop import build_ssl_loader
from dinosys.errors import UserError

PATCH = 8


def _take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def _ids(batches: list[dict]) -> list[int]:
    return [int(v) for b in batches for v in b["labels"]]


def _same(a: list[dict], b: list[dict]) -> bool:
    keys = ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "labels")
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in keys)


def _shard_cfg(id_shards: Path, **kw):
    return tiny_config([(str(id_shards / "{000000..000002}.tar"), 1.0)], **kw)


def test_batches_and_determinism_across_worker_counts(id_shards: Path) -> None:
    cfg0 = _shard_cfg(id_shards, workers=0)
    loader = build_ssl_loader(cfg0, 0, 1, PATCH)
    assert loader.samples_per_epoch == 25 and loader.batches_per_epoch == 8
    first = _take(loader, 4)
    b = first[0]
    assert b["global_crops"].shape == (6, 3, 32, 32) and b["local_crops"].shape == (6, 3, 16, 16)
    assert b["masks"].shape == (6, 16) and b["batch_size"] == 3 and b["labels"].shape == (3,)
    assert _same(first, _take(build_ssl_loader(cfg0, 0, 1, PATCH), 4))
    cfg2 = _shard_cfg(id_shards, workers=2)
    assert _same(first, _take(build_ssl_loader(cfg2, 0, 1, PATCH), 4))
    other_seed = _take(build_ssl_loader(_shard_cfg(id_shards, seed=1), 0, 1, PATCH), 4)
    assert _ids(other_seed) != _ids(first)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_next_unseen_sample(id_shards: Path, workers: int) -> None:
    cfg = _shard_cfg(id_shards, workers=workers)
    uninterrupted = _take(build_ssl_loader(cfg, 0, 1, PATCH), 11)  # crosses an epoch boundary
    first = build_ssl_loader(cfg, 0, 1, PATCH)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    assert state["epoch"] == 0 and state["consumed"] == 15
    resumed = build_ssl_loader(cfg, 0, 1, PATCH)
    resumed.load_state_dict(state)
    tail = _take(resumed, 6)
    assert _same(head + tail, uninterrupted)
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["consumed"] == 9


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_uneven_shards_no_repeats_no_gaps(id_shards: Path, workers: int) -> None:
    """25 samples in shards of 7/13/5, 2 ranks x 3: 4 batches per rank, 24 distinct samples."""
    cfg = _shard_cfg(id_shards, workers=workers)
    ranks = [build_ssl_loader(cfg, r, 2, PATCH) for r in range(2)]
    assert [r.batches_per_epoch for r in ranks] == [4, 4]
    per_rank = [_take(r, 4) for r in ranks]
    seen = _ids(per_rank[0]) + _ids(per_rank[1])
    assert len(seen) == 24 and len(set(seen)) == 24 and set(seen) <= set(range(25))
    assert set(_ids(per_rank[0])).isdisjoint(_ids(per_rank[1]))
    assert [r.state_dict() for r in ranks][0] == ranks[1].state_dict()  # identical positions

    # interrupted after 2 batches on each rank, resumed: the same 24 samples, none twice
    ranks = [build_ssl_loader(cfg, r, 2, PATCH) for r in range(2)]
    heads = [_take(r, 2) for r in ranks]
    state = ranks[0].state_dict()
    resumed = [build_ssl_loader(cfg, r, 2, PATCH) for r in range(2)]
    for r in resumed:
        r.load_state_dict(state)
    tails = [_take(r, 2) for r in resumed]
    again = [i for r in range(2) for i in _ids(heads[r]) + _ids(tails[r])]
    assert sorted(again) == sorted(seen)
    for r in range(2):
        assert _same(heads[r] + tails[r], per_rank[r])


@pytest.mark.parametrize("new_world", [1, 3])
def test_world_size_change_resplits_the_rest_of_the_epoch(id_shards: Path, new_world: int) -> None:
    cfg = _shard_cfg(id_shards)
    old = [build_ssl_loader(cfg, r, 2, PATCH) for r in range(2)]
    done = [i for r in old for i in _ids(_take(r, 1))]  # 6 samples consumed
    state = old[0].state_dict()
    new = [build_ssl_loader(cfg, r, new_world, PATCH) for r in range(new_world)]
    for loader in new:
        loader.load_state_dict(state)
    remaining_batches = (25 - 6) // (3 * new_world)
    rest = [i for loader in new for i in _ids(_take(loader, remaining_batches))]
    assert len(set(done + rest)) == len(done + rest)  # no sample twice
    assert len(rest) == remaining_batches * 3 * new_world
    assert all(loader.state_dict()["epoch"] == 0 for loader in new)
    nxt = [_take(loader, 1)[0] for loader in new]  # then the next epoch starts
    assert all(loader.state_dict()["epoch"] == 1 for loader in new) and len(nxt) == new_world


def test_folder_and_weighted_sources(builtin_data: Path, id_shards: Path) -> None:
    photos = builtin_data / "photos"
    n_photos = sum(1 for p in photos.iterdir() if p.suffix in (".png", ".jpg"))
    cfg = tiny_config([(str(photos), 2.0), (str(id_shards), 1.0)], batch_size=4)
    loader = build_ssl_loader(cfg, 0, 1, PATCH)
    assert loader.samples_per_epoch == 2 * n_photos + 25
    labels = _ids(_take(loader, loader.batches_per_epoch))
    assert labels.count(-1) > 0 and any(v >= 0 for v in labels)  # folder has no classes


def test_bad_data_is_skipped_counted_and_logged(bad_shard: Path, sample_kinds: dict,
                                                caplog: pytest.LogCaptureFixture) -> None:
    n = len(sample_kinds) + 1  # + the sample without an image field
    cfg = tiny_config([(str(bad_shard), 1.0)], batch_size=n)  # one batch = the whole epoch
    loader = build_ssl_loader(cfg, 0, 1, PATCH)
    with caplog.at_level("WARNING"):
        batches = _take(loader, 3)
    assert all(b["global_crops"].shape[0] == 2 * n for b in batches)  # batches stay full
    assert all(torch.isfinite(b["global_crops"]).all() for b in batches)
    stats = loader.stats()
    expected = {"empty", "truncated", "not_image", "too_large", "no_image_field"}
    assert set(stats["bad"]) == expected, stats
    assert all(stats["bad"][r] >= 3 for r in expected)  # each bad sample once per epoch at least
    assert stats["bad_total"] == sum(stats["bad"].values()) and stats["batches"] == 3
    assert any("000000.tar:k" in line for line in stats["recent_bad"])
    assert "k900_no_image" in caplog.text and "000000.tar" in caplog.text
    # the awkward-but-valid kinds (RGBA, palette, 16-bit, CMYK, EXIF) are never rejected
    good_keys = [k for k, v in sample_kinds.items() if v["reason"] is None]
    assert not any(k in caplog.text for k in good_keys)
    cfg2 = tiny_config([(str(bad_shard), 1.0)], batch_size=n, workers=2)
    loader2 = build_ssl_loader(cfg2, 0, 1, PATCH)
    assert _same(_take(loader2, 3), batches)
    assert loader2.stats()["bad"] == stats["bad"]  # counts come back from the workers


@pytest.mark.parametrize("workers", [0, 2])
def test_all_bad_data_fails_clearly(tmp_path: Path, workers: int) -> None:
    write_shard(tmp_path / "000000.tar",
                [{"__key__": f"k{i}", "jpg": b"not a jpeg"} for i in range(5)])
    cfg = tiny_config([(str(tmp_path), 1.0)], batch_size=2, workers=workers)
    loader = build_ssl_loader(cfg, 0, 1, PATCH)
    with pytest.raises(UserError, match="bad samples in a row") as info:
        _take(loader, 1)
    assert "\n" not in str(info.value)  # one line for the CLI, even from a worker process


def test_user_errors(id_shards: Path) -> None:
    with pytest.raises(UserError, match="data.sources is empty"):
        build_ssl_loader(tiny_config([]), 0, 1, PATCH)
    with pytest.raises(UserError, match="fewer than one global batch"):
        _take(build_ssl_loader(_shard_cfg(id_shards, batch_size=13), 0, 2, PATCH), 1)
    with pytest.raises(UserError, match="not a multiple of the patch size"):
        build_ssl_loader(_shard_cfg(id_shards), 0, 1, 14)
    with pytest.raises(UserError, match="version"):
        build_ssl_loader(_shard_cfg(id_shards), 0, 1, PATCH).load_state_dict({"version": 99})


_SIGNAL_WHOLE_GROUP = """
import itertools, os, signal, sys
sys.path.insert(0, sys.argv[2])
from data_helpers import tiny_config
from dinosys.data.multicrop import build_ssl_loader
got = []
cfg = tiny_config([(sys.argv[1] + "/{000000..000002}.tar", 1.0)], workers=2)
it = iter(build_ssl_loader(cfg, 0, 1, 8))
next(it)
# installed after the workers forked, so they do not inherit it (as when a trainer installs its
# handler late, or workers are spawned)
signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))
os.killpg(0, signal.SIGUSR2)  # what Slurm's --signal=USR2@T does: every process of the step
batches = list(itertools.islice(it, 10))
print("ok", len(batches), sorted(set(got)))
"""


def test_workers_survive_preemption_signals_sent_to_the_whole_group(id_shards: Path) -> None:
    """The trainer turns SIGUSR2 into a checkpoint; the loader workers must not die of it."""
    import signal
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _SIGNAL_WHOLE_GROUP, str(id_shards),
                           str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=120, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:2] == ["ok", "10"]
    assert f"[{int(signal.SIGUSR2)}]" in proc.stdout
