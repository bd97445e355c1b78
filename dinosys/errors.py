"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, path, model, data). Printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration: unknown key, wrong type, missing value, unreadable file."""


class NotAvailableError(Exception):
    """A command whose capability is not built yet. Printed as one line, exit code 3."""

    exit_code = 3
