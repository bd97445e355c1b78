"""Every key of a config schema with its type, default and help text (``dinosys config show``),
and the shipped recipes of a command (``dinosys train --help``).

The help text of a key is its field's ``metadata["help"]`` when set, else the comment written
beside the field in its schema (``lr: float = 1e-3  # peak learning rate``) or on the lines right
above it: the schemas keep documenting themselves where they are written.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from dinosys.config.loading import config_dir

_FIELD_LINE = re.compile(r"^\s+(?P<name>[A-Za-z_]\w*)\s*:[^#]*?(?:#\s*(?P<help>.*))?$")
_COMMENT_LINE = re.compile(r"^\s+#\s?(?P<text>.*)$")


@dataclass
class KeyInfo:
    """One config key: dotted name, type, schema default, value in the recipe, help text."""

    key: str
    type: str
    default: Any
    value: Any
    help: str

    @property
    def changed(self) -> bool:
        """True when the recipe sets a value other than the schema default."""
        return self.value != self.default


@cache
def field_help(cls: type) -> dict[str, str]:
    """Help text per field of a config dataclass: ``metadata["help"]``, else the comment beside
    the field or the comment lines right above it in the class source."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's own comment wins
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines[1:]:
            comment = _COMMENT_LINE.match(line)
            if comment:
                above.append(comment.group("text").strip())
                continue
            match = _FIELD_LINE.match(line)
            if match and "(" not in line.split(":")[0] and not line.strip().startswith("def"):
                text = (match.group("help") or "").strip() or " ".join(above)
                if text:
                    out[match.group("name")] = text
            above = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            out[f.name] = str(f.metadata["help"])
    return out


def type_name(tp: Any) -> str:
    """``int``, ``float | None``, ``list[str]``, a section's class name ..."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


REQUIRED = "(required)"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if value == "???":  # omegaconf's MISSING
        return REQUIRED
    return value


def describe(schema: type, value: Any | None = None, default: Any | None = None,
             prefix: str = "") -> list[KeyInfo]:
    """Every leaf key of the config dataclass ``schema``: its type, its default (from
    ``default``, an instance holding the enclosing section's defaults, else the field defaults)
    and, with ``value`` (a loaded config), the value it has there; nested sections are walked.
    Help texts come from :func:`field_help`."""
    hints = typing.get_type_hints(schema)
    helps = field_help(schema)
    rows: list[KeyInfo] = []
    for f in dataclasses.fields(schema):
        d = getattr(default, f.name) if default is not None else _default(f)
        v = getattr(value, f.name) if value is not None else d
        key = f"{prefix}{f.name}"
        tp = hints.get(f.name, type(v))
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            sub_value = v if dataclasses.is_dataclass(v) else None
            sub_default = d if dataclasses.is_dataclass(d) else None
            rows += describe(type(sub_value) if sub_value is not None else tp, sub_value,
                             sub_default, key + ".")
            continue
        rows.append(KeyInfo(key, type_name(tp), _plain(d), _plain(v), helps.get(f.name, "")))
    return rows


def shipped_recipes(kind: str) -> list[str]:
    """Names of the YAML recipes under ``configs/<kind>/`` (what CONFIG may name)."""
    folder = Path(config_dir()) / kind
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _short(value: Any, width: int = 40) -> str:
    text = "null" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(rows: list[KeyInfo], show_value: bool) -> list[str]:
    """Aligned text lines: key, type, default (and the recipe's value), help."""
    header = ["key", "type", "default"] + (["value"] if show_value else []) + ["help"]
    cells = [[r.key, r.type, _short(r.default)] + ([_short(r.value)] if show_value else [])
             + [r.help] for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header) - 1)]
    out = []
    for c in [header, *cells]:
        out.append("  ".join(v.ljust(w) for v, w in zip(c[:-1], widths)) + "  " + c[-1])
    return [line.rstrip() for line in out]
