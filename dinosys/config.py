"""Structured configuration: dataclasses hold every default, YAML files hold overrides.

Composition order: dataclass defaults <- base files (``_base_``) <- the config file <- ``key=value``
overrides. Every error (unknown key, wrong type, missing value, unreadable file, bad value) is
raised as :class:`~dinosys.errors.ConfigError` with one line naming the key and, for a typo, the
closest valid key. Value checks live in each dataclass's ``__post_init__`` so that they run
whenever a config object is built.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.errors import ConfigError

T = TypeVar("T")

BASE_KEY = "_base_"
CONFIG_DIR_ENV = "DINOSYS_CONFIG_DIR"


def check_choice(value: Any, choices: Iterable[Any], key: str) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {choices}")


def check_range(value: float, key: str, low: float | None = None,
                high: float | None = None) -> None:
    """Raise ConfigError unless ``low <= value <= high`` (either bound may be None)."""
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"config key '{key}': {value!r} is outside [{low}, {high}]")


# --------------------------------------------------------------------------- concern configs


@dataclass
class BackboneConfig:
    """Vision transformer backbone (see dinosys.models.create_backbone)."""

    # vit_tiny, vits14, vitb14, vitl14, vitg14; a "_reg" suffix adds 4 registers
    arch: str = "vits14"
    img_size: int = 224  # image size the learned position embedding is laid out for
    patch_size: int | None = None  # None: the arch's (14; 4 for vit_tiny)
    in_chans: int = 3
    embed_dim: int | None = None  # None: the arch's
    depth: int | None = None
    num_heads: int | None = None
    ffn: str | None = None  # "mlp" or "swiglu"; None: the arch's
    num_registers: int | None = None  # None: 4 for "_reg" archs, else 0
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True
    layerscale_init: float | None = 1e-5  # None disables LayerScale
    attn_backend: str = "auto"  # auto, sdpa, xformers, math

    def __post_init__(self) -> None:
        check_choice(self.attn_backend, ("auto", "sdpa", "xformers", "math"), "model.attn_backend")
        if self.ffn is not None:
            check_choice(self.ffn, ("mlp", "swiglu"), "model.ffn")
        check_range(self.drop_path_rate, "model.drop_path_rate", 0.0, 1.0)


@dataclass
class HeadConfig:
    """DINO and iBOT projection heads."""

    n_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    last_layer: str = "weight_norm"  # weight_norm or linear
    ibot_separate_head: bool = False
    ibot_n_prototypes: int = 65536
    ibot_hidden_dim: int = 2048
    ibot_bottleneck_dim: int = 256

    def __post_init__(self) -> None:
        check_choice(self.last_layer, ("weight_norm", "linear"), "heads.last_layer")


@dataclass
class SSLLossConfig:
    """Loss weights, temperatures and teacher normalisation of the DINOv2 objective."""

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    centering: str = "centering"  # centering or sinkhorn_knopp
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3

    def __post_init__(self) -> None:
        check_choice(self.centering, ("centering", "sinkhorn_knopp"), "loss.centering")


@dataclass
class CropConfig:
    """Multi-crop augmentation (2 global + n_local local crops)."""

    global_size: int = 224
    local_size: int = 98
    n_global: int = 2
    n_local: int = 8
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p_global1: float = 1.0
    blur_p_global2: float = 0.1
    blur_p_local: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p_global2: float = 0.2
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def __post_init__(self) -> None:
        for name in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p_global1",
                     "blur_p_global2", "blur_p_local", "solarize_p_global2"):
            check_range(getattr(self, name), f"crops.{name}", 0.0, 1.0)
        if self.n_global != 2:
            raise ConfigError("config key 'crops.n_global': DINOv2 uses exactly 2 global crops")


@dataclass
class MaskConfig:
    """iBOT block masking of the student's global crops."""

    mask_probability: float = 0.5
    ratio_min: float = 0.1
    ratio_max: float = 0.5
    min_patches_per_block: int = 4
    aspect_min: float = 0.3

    def __post_init__(self) -> None:
        check_range(self.mask_probability, "masking.mask_probability", 0.0, 1.0)
        check_range(self.ratio_min, "masking.ratio_min", 0.0, 1.0)
        check_range(self.ratio_max, "masking.ratio_max", self.ratio_min, 1.0)


@dataclass
class DataSourceConfig:
    """One input: an image folder, a file list (.txt), or WebDataset shards (brace pattern)."""

    path: str = MISSING
    weight: float = 1.0
    kind: str = "auto"  # auto, folder, list, shards

    def __post_init__(self) -> None:
        check_choice(self.kind, ("auto", "folder", "list", "shards"), "data.sources.kind")


@dataclass
class DataConfig:
    """Training input pipeline."""

    sources: list[DataSourceConfig] = field(default_factory=list)
    batch_size_per_gpu: int = 64
    num_workers: int = 8
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

    def __post_init__(self) -> None:
        check_choice(self.decoder, ("auto", "simplejpeg", "pil"), "data.decoder")
        if self.batch_size_per_gpu < 1:
            raise ConfigError("config key 'data.batch_size_per_gpu': must be >= 1")
        check_range(self.max_bad_fraction, "data.max_bad_fraction", 0.0, 1.0)


@dataclass
class OptimConfig:
    """AdamW and the lr / weight-decay / teacher-momentum schedules (DINOv2 "epochs")."""

    base_lr: float = 4e-3
    lr_scaling: str = "sqrt"  # sqrt, linear or none, relative to reference_batch
    reference_batch: int = 1024
    min_lr: float = 1e-6
    epochs: int = 100
    iters_per_epoch: int = 1250
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: float = 1
    clip_grad: float = 3.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_choice(self.lr_scaling, ("sqrt", "linear", "none"), "optim.lr_scaling")


@dataclass
class DistConfig:
    """Distribution and performance: FSDP2, mixed precision, activation checkpointing, compile."""

    fsdp: bool = True  # FSDP2 fully_shard when more than one rank
    param_dtype: str = "bf16"  # fp32, bf16, fp16
    reduce_dtype: str = "fp32"
    grad_accum_steps: int = 1
    activation_checkpointing: bool = False
    compile: bool = False
    pack_tokens: bool = False  # all crops' tokens as one tensor per block (models.vit)

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            check_choice(getattr(self, name), ("fp32", "bf16", "fp16"), f"dist.{name}")
        if self.grad_accum_steps < 1:
            raise ConfigError("config key 'dist.grad_accum_steps': must be >= 1")


@dataclass
class CheckpointConfig:
    """Sharded, atomic checkpoints."""

    every_n_steps: int = 1250
    keep_last: int = 3
    keep_every: int = 0  # also keep every K-th step forever (0: off)
    resume: bool = True

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise ConfigError("config key 'checkpoint.every_n_steps': must be >= 0 (0: off)")
        if self.keep_last < 1:
            raise ConfigError("config key 'checkpoint.keep_last': must be >= 1")
        if self.keep_every < 0:
            raise ConfigError("config key 'checkpoint.keep_every': must be >= 0 (0: off)")


@dataclass
class LogConfig:
    """Per-step metrics."""

    every_n_steps: int = 10
    tensorboard: bool = False
    peak_tflops: float | None = None  # per device; None: by exact GPU name + dtype (metrics)
    progress: bool = True


@dataclass
class PeriodicEvalConfig:
    """kNN evaluation during training (collapse watch)."""

    knn_every_n_steps: int = 0  # 0: off
    knn_train: str | None = None
    knn_val: str | None = None
    knn_k: list[int] = field(default_factory=lambda: [10, 20])
    knn_temperature: float = 0.07


# --------------------------------------------------------------------------- job configs


@dataclass
class TrainConfig:
    """`dinosys train`: DINOv2 self-supervised pretraining (DINO + iBOT + KoLeo)."""

    name: str = "dinov2"
    seed: int = 0
    max_steps: int | None = None  # None: optim.epochs * optim.iters_per_epoch
    max_consecutive_nonfinite: int = 5
    # testing aid: the first try of each listed step gets a NaN loss (list a step k times to
    # poison k tries in a row); exercises the skip-and-count path end to end
    debug_nonfinite_steps: list[int] = field(default_factory=list)
    model: BackboneConfig = field(default_factory=BackboneConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    loss: SSLLossConfig = field(default_factory=SSLLossConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    masking: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)


# --------------------------------------------------------------------------- loading


def config_dir() -> Path:
    """The directory holding named configs: $DINOSYS_CONFIG_DIR or the repository's configs/."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


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


def load_config(schema: type[T], config: str | os.PathLike | None = None,
                overrides: Sequence[str] = (), kind: str | None = None) -> T:
    """Build a validated config object: ``schema`` defaults <- config file chain <- overrides.

    ``config`` is a YAML path or a name under configs/ (``kind``: preferred subfolder such as
    "train"). Returns an instance of ``schema`` (a dataclass) with every value checked.
    """
    merged: DictConfig = OmegaConf.structured(schema)
    layers: list[tuple[str, Any]] = []
    if config is not None:
        for path, data in _load_chain(find_config(config, kind), kind):
            layers.append((str(path), data))
    if overrides:
        layers.append(("command-line overrides", _parse_overrides(overrides)))
    for source, data in layers:
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
