"""Load, merge and validate configs: dataclass defaults <- ``_base_`` files <- the config file
<- ``key=value`` overrides.

Every error (unknown key, wrong type, missing value, unreadable file, bad value) is raised as
:class:`~dinosys.errors.ConfigError` with one line naming the key and, for a typo, the closest
valid key. The schemas are not here: each section's dataclass lives beside the code it
configures (its ``validate()`` holds the value checks, see :class:`dinosys.config.Section`), and
each training task's schema extends the run-level schema (``dinosys.train.tasks``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from dinosys.errors import ConfigError

T = TypeVar("T")

BASE_KEY = "_base_"
CONFIG_DIR_ENV = "DINOSYS_CONFIG_DIR"


def config_dir() -> Path:
    """The directory holding named configs: $DINOSYS_CONFIG_DIR or the repository's configs/."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def find_config(name_or_path: str | os.PathLike, kind: str | None = None,
                relative_to: Path | None = None) -> Path:
    """Resolve a config path, or a name under configs/ (``kind`` names the preferred subfolder)."""
    text = str(name_or_path)
    candidates = [Path(text)]
    if relative_to is not None:
        candidates.insert(0, relative_to / text)
    for cand in candidates:
        if cand.is_file():
            return cand
    if Path(text).is_dir():
        raise ConfigError(f"config path '{text}' is a directory, not a YAML file")
    root = config_dir()
    if Path(text).is_absolute():  # rglob refuses absolute patterns; it cannot be a name anyway
        raise ConfigError(f"config file not found: '{text}'")
    stem = text[:-5] if text.endswith(".yaml") else text
    found = sorted(root.rglob(f"{stem}.yaml")) if root.is_dir() else []
    if kind is not None:
        preferred = [p for p in found if p.parent.name == kind]
        found = preferred or found
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found)
        raise ConfigError(f"config name '{text}' is ambiguous: {names}; pass a path")
    known = sorted(p.stem for p in root.rglob("*.yaml")) if root.is_dir() else []
    close = difflib.get_close_matches(stem, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known names: {', '.join(known)}"
    raise ConfigError(
        f"config file not found: '{text}' (not a file, not a name under {root}){hint}")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"cannot parse config file {path}{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def _load_chain(path: Path, kind: str | None,
                seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The file and its ``_base_`` ancestors, base first."""
    path = path.resolve()
    if path in seen:
        cycle = " -> ".join(str(p.name) for p in (*seen, path))
        raise ConfigError(f"config files include each other: {cycle}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    chain: list[tuple[Path, dict]] = []
    if bases is not None:
        for base in [bases] if isinstance(bases, str) else list(bases):
            base_path = find_config(base, kind, relative_to=path.parent)
            chain.extend(_load_chain(base_path, kind, (*seen, path)))
    chain.append((path, data))
    return chain


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}{key}"
            keys.append(full)
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                keys.extend(_all_keys(child, full + "."))
    return keys


def _closest_key(cfg: DictConfig, full_key: str) -> str | None:
    """The valid key closest to a misspelled one: same section first, then anywhere."""
    valid = _all_keys(cfg)
    parent, _, leaf = full_key.rpartition(".")
    siblings = [k for k in valid if k.rpartition(".")[0] == parent]
    match = difflib.get_close_matches(full_key, siblings, n=1, cutoff=0.6)
    if match:
        return match[0]
    by_leaf = [k for k in valid if k.rpartition(".")[2] == leaf]
    if len(by_leaf) == 1:
        return by_leaf[0]
    match = difflib.get_close_matches(full_key, valid, n=1, cutoff=0.6)
    return match[0] if match else None


def _explain(exc: oc_errors.OmegaConfBaseException, base: DictConfig, source: str) -> ConfigError:
    full_key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    if isinstance(exc, oc_errors.ConfigKeyError) and "not in" in str(exc):
        close = _closest_key(base, str(full_key))
        owner = getattr(exc, "object_type", None)
        what = f"'{full_key}'"
        if close is None and is_dataclass(owner):  # inside a list item: omegaconf gives no path
            names = difflib.get_close_matches(str(full_key), field_names(owner), n=1)
            close = names[0] if names else None
            what += f" of {owner.__name__}"
        hint = f"; did you mean '{close}'?" if close else ""
        return ConfigError(f"unknown config key {what} (from {source}){hint}")
    if isinstance(exc, oc_errors.ValidationError) and full_key == "?":
        msg = str(exc).splitlines()[0]
        return ConfigError(f"config has a wrong type or value (from {source}): {msg}")
    if isinstance(exc, oc_errors.ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(
            f"config key '{full_key}' has a wrong type or value (from {source}): {msg}")
    if isinstance(exc, oc_errors.MissingMandatoryValue):
        return ConfigError(f"config key '{full_key}' is required but has no value")
    msg = str(exc).splitlines()[0]
    return ConfigError(f"invalid config (from {source}) at '{full_key}': {msg}")


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"override '{item}' must look like key=value (e.g. optim.base_lr=1e-3)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:  # omegaconf raises several grammar error types
        first = str(exc).splitlines()[0]
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {first}") from exc


def _layers(config: str | os.PathLike | None, overrides: Sequence[str],
            kind: str | None) -> list[tuple[str, Any]]:
    """(source name, data) of the config file chain (base first), then the overrides."""
    layers: list[tuple[str, Any]] = []
    if config is not None:
        for path, data in _load_chain(find_config(config, kind), kind):
            layers.append((str(path), data))
    if overrides:
        layers.append(("command-line overrides", _parse_overrides(overrides)))
    return layers


def peek_value(key: str, config: str | os.PathLike | None = None,
               overrides: Sequence[str] = (), kind: str | None = None) -> Any:
    """The value the config files and overrides give the top-level ``key`` (the last one
    wins), or None when none sets it; no schema applies (used to pick the schema, e.g. the
    ``task`` key picks the training task's)."""
    value = None
    for _, data in _layers(config, overrides, kind):
        if key in data:
            value = data[key]
    return value


def load_config(schema: type[T], config: str | os.PathLike | None = None,
                overrides: Sequence[str] = (), kind: str | None = None) -> T:
    """Build a validated config object: ``schema`` defaults <- config file chain <- overrides.

    ``config`` is a YAML path or a name under configs/ (``kind``: preferred subfolder such as
    "train"). Returns an instance of ``schema`` (a dataclass) with every value checked.
    """
    merged: DictConfig = OmegaConf.structured(schema)
    for source, data in _layers(config, overrides, kind):
        try:
            merged = OmegaConf.merge(merged, data)
        except oc_errors.OmegaConfBaseException as exc:
            raise _explain(exc, merged, source) from exc
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"config key '{missing[0]}' is required but has no value")
    try:
        obj = OmegaConf.to_object(merged)
    except oc_errors.OmegaConfBaseException as exc:
        raise _explain(exc, merged, "resolution") from exc
    except ConfigError:
        raise
    return obj  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    node = OmegaConf.structured(cfg) if is_dataclass(cfg) else OmegaConf.create(cfg)
    return OmegaConf.to_yaml(node, resolve=True)


def to_dict(cfg: Any) -> dict:
    """The config as plain Python containers."""
    node = OmegaConf.structured(cfg) if is_dataclass(cfg) else cfg
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def save_config(cfg: Any, run_dir: Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` atomically and return its path."""
    from dinosys.atomic import write_atomic

    path = Path(run_dir) / "config.yaml"
    write_atomic(path, to_yaml(cfg))
    return path


def field_names(schema: type) -> list[str]:
    """Top-level field names of a config dataclass (for help texts)."""
    return [f.name for f in fields(schema)]
