"""The embedded data is built only under data.builtin_root (issue 18, item 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinosys.distributed.env import DistEnv
from dinosys.errors import UserError
from dinosys.train.run import ensure_builtin_sources


@pytest.mark.parametrize("tail", ["mnist/train", "digits/val", "photos", "shards/mnist"])
def test_a_mistyped_path_ending_like_builtin_data_is_not_found(tiny_cfg, tmp_path: Path,
                                                               tail: str) -> None:
    typo = tmp_path / "my_dataa" / tail
    cfg = tiny_cfg(f"data.sources=[{{path: {typo}}}]",
                   f"data.builtin_root={tmp_path / 'data' / 'builtin'}")
    with pytest.raises(UserError, match=r"training data not found: .*data.builtin_root"):
        ensure_builtin_sources(cfg, DistEnv())
    assert list(tmp_path.iterdir()) == []  # nothing was built anywhere
