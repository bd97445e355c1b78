"""Rank-range validation and the teacher-output exchange on 4 gloo ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinosys.distill.ranks import (
    RankLayout,
    parse_rank_ranges,
    to_crop_major,
    to_image_major,
)
from dinosys.errors import UserError

WORKER = Path(__file__).with_name("ranks_worker.py")
REPO = Path(__file__).resolve().parents[2]


def test_valid_ranges() -> None:
    assert parse_rank_ranges({"s": None, "b": None}, 4) == {"s": range(4), "b": range(4)}
    assert parse_rank_ranges({"s": [0, 0], "b": [1, 3]}, 4) == {"s": range(1), "b": range(1, 4)}


@pytest.mark.parametrize("ranges, match", [
    ({"s": [0, 2], "b": [2, 3]}, "overlap: rank 2 is in both 's' and 'b'"),
    ({"s": [0, 0], "b": [2, 3]}, r"do not cover the world \(4 ranks\): ranks \[1\]"),
    ({"s": [0, 4], "b": [1, 3]}, "outside the 4 ranks"),
    ({"s": [0, 1], "b": None}, "for every student or for none"),
    ({"s": [1], "b": [0, 0]}, "must be \\[first, last\\]"),
    ({}, "at least one student"),
])
def test_bad_ranges_are_one_line_errors(ranges, match) -> None:
    with pytest.raises(UserError, match=match) as info:
        parse_rank_ranges(ranges, 4)
    assert "\n" not in str(info.value)


def test_split_counts_route_every_image_once() -> None:
    ranges = {"s": range(0, 1), "b": range(1, 4)}
    world, per_rank = 4, 3
    sends = [RankLayout(ranges, world, r).split_counts(per_rank) for r in range(world)]
    for r in range(world):
        send, recv = sends[r]
        assert sum(send) == 2 * per_rank  # each image goes to one rank of each student
        assert recv == [sends[j][0][r] for j in range(world)]  # what j sends to r, r receives
    assert sum(sends[0][1]) == 12 and all(sum(sends[r][1]) == 4 for r in (1, 2, 3))
    with pytest.raises(UserError, match="does not split evenly"):
        RankLayout({"s": range(0, 1), "b": range(1, 4)}, 4, 1).images_per_rank("b", 10)


def test_crop_major_round_trip() -> None:
    x = torch.arange(2 * 3 * 5).reshape(6, 5)
    im = to_image_major(x, 2)
    assert im.shape == (3, 2, 5) and torch.equal(im[1, 1], x[4])
    assert torch.equal(to_crop_major(im), x)


@pytest.mark.dist
@pytest.mark.parametrize("spec", ['{"s": [0, 1], "b": [2, 3]}', '{"s": [0, 0], "b": [1, 3]}'])
def test_teacher_sharded_over_world_outputs_reach_each_subgroup(tmp_path: Path, spec: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(WORKER), str(tmp_path), spec]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    ranges = json.loads(spec)
    for res_r in results:
        first, last = ranges[res_r["student"]]
        n = last - first + 1
        assert res_r["rows"] == 12 // n and res_r["group_size"] == n
        assert res_r["cls_diff"] < 1e-5 and res_r["patch_diff"] < 1e-5
        assert res_r["crops_equal"] and res_r["masks_equal"]
        assert res_r["mask_dtype"] == "torch.bool"
    # together, each student's ranks hold the whole global batch of 12 images, in order
    for name, (first, last) in ranges.items():
        chunks = [r["chunk"] for r in results if r["student"] == name]
        assert sorted(chunks) == [[k * 12 // (last - first + 1), (k + 1) * 12 // (last - first + 1)]
                                  for k in range(last - first + 1)]


def test_the_gpu_recipe_ranges_cover_48_ranks_and_split_the_batch() -> None:
    from dinosys.config import load_config
    from dinosys.distill.config import DistillConfig

    cfg = load_config(DistillConfig, "vitg14_to_s_b_l", kind="distill")
    world = 48
    layout = RankLayout(parse_rank_ranges({s.name: s.ranks for s in cfg.students}, world),
                        world, 0)
    g = cfg.data.batch_size_per_gpu * world
    assert {n: layout.images_per_rank(n, g) for n in layout.ranges} == {
        "vits14": 160, "vitb14": 80, "vitl14": 32}
