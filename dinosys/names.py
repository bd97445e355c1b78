"""Checks for user-given names and values that end up in file names or shell scripts.

A run or job name becomes a folder under ``runs/`` and a Slurm ``--job-name``; any value that
reaches an sbatch script becomes a ``#SBATCH`` line. A name is letters, digits and ``._-`` (not
only dots), so it can neither leave ``runs/`` (``../x``) nor end a script line (a newline).
"""

from __future__ import annotations

import re

from dinosys.errors import UserError

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(value: str, what: str) -> str:
    """``value`` if a safe name (letters, digits, ``._-``, not only dots), else UserError."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or not value.strip("."):
        raise UserError(f"{what} {value!r} is not a valid name: use letters, digits and . _ - "
                        "(it names a run folder and a Slurm job)")
    return value


def check_script_value(value: object, what: str) -> object:
    """``value`` when its text has no control character (newline, tab, NUL...), else UserError.

    Values are shell-quoted in the script, but a newline still ends a ``#SBATCH`` comment line
    and starts a command.
    """
    if _CONTROL.search(str(value)):
        raise UserError(f"{what} {str(value)!r} contains a control character (newline, tab...); "
                        "it would end up in the sbatch script")
    return value
