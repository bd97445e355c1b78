"""Every out-of-range config value is one line naming the key, exit 2, for every task's config
(issue 18, item 11): the checks live in the config sections, so train, launch and any recipe
built on them get the same ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

BAD = [
    ("log.every_n_steps=0", "log.every_n_steps"),
    ("crops.global_size=0", "crops.global_size"),
    ("crops.local_size=0", "crops.local_size"),
    ("crops.n_local=-1", "crops.n_local"),
    ("heads.n_prototypes=0", "heads.n_prototypes"),
    ("heads.hidden_dim=0", "heads.hidden_dim"),
    ("seed=-1", "seed"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction"),
    ("model.depth=0", "model.depth"),
    ("model.embed_dim=0", "model.embed_dim"),
    ("model.num_heads=0", "model.num_heads"),
    ("model.patch_size=0", "model.patch_size"),
    ("optim.base_lr=-1", "optim.base_lr"),
    ("optim.epochs=-1", "optim.epochs"),
    ("optim.iters_per_epoch=0", "optim.iters_per_epoch"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("max_steps=0", "max_steps"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("checkpoint.every_n_steps=-5", "checkpoint.every_n_steps"),
    ("eval.knn_every_n_steps=-1", "eval.knn_every_n_steps"),
    ("dist.grad_accum_steps=0", "dist.grad_accum_steps"),
]


def _train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """`dinosys train` with data that does not exist: a value the checks miss fails later with
    "not found" (the test then fails on the message) instead of training."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    nowhere = [f"data.sources=[{{path: {cwd / 'nowhere'}}}]", "eval.knn_every_n_steps=0"]
    return subprocess.run([sys.executable, "-m", "dinosys.cli", "train", "mnist_tiny_cpu",
                           *nowhere, *overrides], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


@pytest.mark.parametrize("override, key", BAD)
def test_out_of_range_value_is_one_line(override: str, key: str, tmp_path: Path) -> None:
    res = _train(override, cwd=tmp_path)
    err = res.stderr.strip()
    assert res.returncode == 2, (override, res.returncode, res.stderr[-2000:])
    assert "\n" not in err and "Traceback" not in err, err
    assert f"'{key}'" in err, (key, err)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_the_checks_hold_for_every_way_a_config_is_built() -> None:
    """Defaults, YAML and overrides all go through the sections' validation."""
    import dataclasses

    from dinosys.config import load_config
    from dinosys.errors import ConfigError
    from dinosys.train.tasks.ssl import SSLConfig

    cfg = load_config(SSLConfig, "mnist_tiny_cpu")
    with pytest.raises(ConfigError, match="log.every_n_steps"):
        dataclasses.replace(cfg.log, every_n_steps=0)
    with pytest.raises(ConfigError, match="model.depth"):
        dataclasses.replace(cfg.model, depth=0)


def test_an_exported_config_with_a_wrong_type_is_one_line(tmp_path: Path) -> None:
    import json

    from dinosys.errors import UserError
    from dinosys.export import load, save_native
    from dinosys.models import create_backbone

    out = save_native(create_backbone("vit_tiny", layerscale_init=None).eval(), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["architecture"]["depth"] = "four"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="architecture field 'depth' is 'four', expected int"):
        load(out)
