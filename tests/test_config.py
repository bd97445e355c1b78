"""dinosys.config: composition order, name lookup, error messages, save/load round trip."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dinosys.config import CONFIG_DIR_ENV, find_config, load_config, save_config, to_dict
from dinosys.data.sources import DataSourceConfig
from dinosys.errors import ConfigError, UserError
from dinosys.train.tasks.ssl import SSLConfig


def _yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def config_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private configs/ directory (DINOSYS_CONFIG_DIR) and a cwd without configs."""
    root = tmp_path / "configs"
    root.mkdir()
    monkeypatch.setenv(CONFIG_DIR_ENV, str(root))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return root


def test_defaults_come_from_the_dataclasses(config_root: Path) -> None:
    cfg = load_config(SSLConfig)
    assert isinstance(cfg, SSLConfig) and cfg == SSLConfig()
    assert cfg.optim.base_lr == 4e-3 and cfg.model.arch == "vits14" and cfg.data.sources == []


def test_order_defaults_base_file_overrides(tmp_path: Path, config_root: Path) -> None:
    _yaml(tmp_path / "a" / "base.yaml",
          "name: base\noptim:\n  base_lr: 1.0\n  epochs: 5\nmodel:\n  arch: vit_tiny\n")
    _yaml(tmp_path / "a" / "other.yaml", "optim:\n  epochs: 7\n  min_lr: 0.5\n")
    child = _yaml(tmp_path / "a" / "child.yaml",
                  "_base_: [base.yaml, other.yaml]\noptim:\n  base_lr: 2.0\n")
    cfg = load_config(SSLConfig, child)
    assert cfg.optim.base_lr == 2.0  # file over base
    assert cfg.optim.epochs == 7 and cfg.optim.min_lr == 0.5  # later base over earlier base
    assert cfg.model.arch == "vit_tiny" and cfg.name == "base"  # from the first base
    assert cfg.optim.warmup_epochs == 10  # untouched default
    cfg = load_config(SSLConfig, str(child), ["optim.base_lr=3", "model.arch=vitb14"])
    assert cfg.optim.base_lr == 3.0 and cfg.model.arch == "vitb14" and cfg.optim.epochs == 7


def test_names_resolve_under_the_config_dir(config_root: Path) -> None:
    _yaml(config_root / "train" / "recipe.yaml", "name: from_train\n")
    _yaml(config_root / "eval" / "recipe.yaml", "name: from_eval\n")
    _yaml(config_root / "train" / "child.yaml", "_base_: recipe\nseed: 3\n")
    assert load_config(SSLConfig, "recipe", kind="train").name == "from_train"
    assert load_config(SSLConfig, "recipe.yaml", kind="eval").name == "from_eval"
    child = load_config(SSLConfig, "child", kind="train")
    assert (child.name, child.seed) == ("from_train", 3)
    with pytest.raises(ConfigError, match="ambiguous"):
        find_config("recipe")
    with pytest.raises(ConfigError, match="did you mean 'recipe'"):
        find_config("recipee", kind="train")
    # a path in the cwd wins over a name
    _yaml(Path("recipe.yaml"), "name: local\n")
    assert load_config(SSLConfig, "recipe.yaml", kind="train").name == "local"


@pytest.mark.parametrize(("override", "expected"), [
    ("optim.base_lrr=1", "did you mean 'optim.base_lr'"),
    ("optim.warmup_epoch=1", "did you mean 'optim.warmup_epochs'"),
    ("base_lr=1", "did you mean 'optim.base_lr'"),  # right leaf, wrong section
    ("model.archh=vitb14", "did you mean 'model.arch'"),
    ("data.sources=[{path: x, wieght: 2}]", "did you mean 'weight'"),  # inside a list item
])
def test_unknown_keys_suggest_the_closest(config_root: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="unknown config key") as info:
        load_config(SSLConfig, None, [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path, config_root: Path) -> None:
    path = _yaml(tmp_path / "typo.yaml", "optim:\n  base_lrr: 1\n")
    pattern = r"'optim.base_lrr' \(from .*typo.yaml\).*'optim.base_lr'"
    with pytest.raises(ConfigError, match=pattern):
        load_config(SSLConfig, path)


def test_far_off_key_gets_no_suggestion(config_root: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SSLConfig, None, ["zzzqqq=1"])
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(("override", "pattern"), [
    ("optim.base_lr=abc", r"'optim.base_lr' has a wrong type"),
    ("seed=1.5", r"'seed' has a wrong type"),
    ("optim.betas=[a,b]", r"'optim.betas\[0\]' has a wrong type"),
    ("model=3", r"wrong type or value"),
    ("data.sources=[{weight: 1}]", r"'data.sources\[0\].path' is required"),
    ("model.attn_backend=flash", r"'model.attn_backend': 'flash' is not one of"),
    ("crops.flip_p=2", r"'crops.flip_p': 2.0 is outside"),
    ("optim.base_lr=[", r"cannot parse overrides"),
    ("optim", r"must look like key=value"),
    ("=3", r"must look like key=value"),
])
def test_bad_values_are_one_line_config_errors(config_root: Path, override: str,
                                               pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(SSLConfig, None, [override])
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UserError)


def test_sources_become_typed_items(config_root: Path) -> None:
    cfg = load_config(SSLConfig, None, ["data.sources=[{path: /d/a}, {path: /d/b, weight: 3}]"])
    assert cfg.data.sources == [DataSourceConfig(path="/d/a"), DataSourceConfig("/d/b", 3.0)]
    assert cfg.data.sources[0].kind == "auto"


def test_file_errors(tmp_path: Path, config_root: Path) -> None:
    cases = {
        "missing": (tmp_path / "nothere.yaml", "config file not found"),
        "directory": (tmp_path, "is a directory"),
        "syntax": (_yaml(tmp_path / "bad.yaml", "optim: [1\n"), r"cannot parse .*bad.yaml line 2"),
        "tab": (_yaml(tmp_path / "tab.yaml", "optim:\n\tbase_lr: 1\n"), r"cannot parse"),
        "list": (_yaml(tmp_path / "list.yaml", "- 1\n- 2\n"), "must hold a mapping"),
        "binary": (tmp_path / "bin.yaml", "not UTF-8"),
    }
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00 binary")
    for path, pattern in cases.values():
        with pytest.raises(ConfigError, match=pattern):
            load_config(SSLConfig, path)
        with pytest.raises(ConfigError, match=pattern):  # same for a string path
            load_config(SSLConfig, str(path))


def test_unreadable_file(tmp_path: Path, config_root: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    path = _yaml(tmp_path / "secret.yaml", "seed: 1\n")
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(SSLConfig, path)


def test_empty_file_means_defaults(tmp_path: Path, config_root: Path) -> None:
    assert load_config(SSLConfig, _yaml(tmp_path / "empty.yaml", "")) == SSLConfig()


def test_base_cycles_and_missing_bases(tmp_path: Path, config_root: Path) -> None:
    _yaml(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _yaml(tmp_path / "b.yaml", "_base_: a.yaml\n")
    _yaml(tmp_path / "self.yaml", "_base_: self.yaml\n")
    _yaml(tmp_path / "orphan.yaml", "_base_: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"include each other: a.yaml -> b.yaml -> a.yaml"):
        load_config(SSLConfig, tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(SSLConfig, tmp_path / "self.yaml")
    with pytest.raises(ConfigError, match="'gone.yaml'"):
        load_config(SSLConfig, tmp_path / "orphan.yaml")


def test_save_config_round_trip(tmp_path: Path, config_root: Path) -> None:
    cfg = load_config(SSLConfig, None, [
        "name=roundtrip", "optim.base_lr=1e-4", "model.arch=vit_tiny", "model.patch_size=4",
        "data.sources=[{path: /data/a, weight: 2}]", "crops.local_scale=[0.1,0.3]",
        "log.peak_tflops=989.0",
    ])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left
    again = load_config(SSLConfig, path)
    assert again == cfg
    assert to_dict(again)["data"]["sources"] == [{"path": "/data/a", "weight": 2.0, "kind": "auto"}]
