"""Value checks of config sections: :class:`Section` and the helpers its ``validate`` uses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dinosys.errors import ConfigError


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


Bounds = dict[str, tuple[float | None, float | None]]


def check_bounds(section: Any, prefix: str, bounds: Bounds) -> None:
    """Check each named numeric field of ``section`` (every element of a list field; ``None``
    means unset and passes) against its inclusive ``(low, high)`` bounds (either may be None);
    ConfigError naming ``prefix.field`` and the bound otherwise."""
    for name, (low, high) in bounds.items():
        value = getattr(section, name)
        key = f"{prefix}.{name}" if prefix else name
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None:
                continue
            if low is not None and item < low:
                raise ConfigError(f"config key '{key}': must be >= {low:g}, got {item!r}")
            if high is not None and item > high:
                raise ConfigError(f"config key '{key}': must be <= {high:g}, got {item!r}")


class Section:
    """Base of every config section dataclass (each lives beside the code it configures).

    ``validate()`` is the one place for a section's value checks (choices, ranges, relations
    between its fields): it runs whenever the section is built (defaults, YAML, overrides,
    ``dataclasses.replace``) and raises :class:`~dinosys.errors.ConfigError` naming the key.
    Subclasses override ``validate`` (calling ``super().validate()`` when they extend another
    section) and never define ``__post_init__``.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the section's values; raise ConfigError naming the key (nothing to check)."""
