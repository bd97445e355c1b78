"""Configuration: load / merge / validate only.

Schemas live beside the code they configure (each section is a :class:`Section` dataclass with a
``validate()``); a training task's schema extends the run-level schema
(:class:`dinosys.train.tasks.RunConfig`). ``load_config(schema, CONFIG, overrides)`` builds a
checked config object; ``dinosys.train.tasks.load_task_config`` picks the schema by ``task``.
"""

from dinosys.config.checks import Section, check_bounds, check_choice, check_range
from dinosys.config.loading import (
    BASE_KEY,
    CONFIG_DIR_ENV,
    config_dir,
    field_names,
    find_config,
    load_config,
    peek_value,
    save_config,
    to_dict,
    to_yaml,
)
from dinosys.errors import ConfigError

__all__ = [
    "BASE_KEY",
    "CONFIG_DIR_ENV",
    "ConfigError",
    "Section",
    "check_bounds",
    "check_choice",
    "check_range",
    "config_dir",
    "field_names",
    "find_config",
    "load_config",
    "peek_value",
    "save_config",
    "to_dict",
    "to_yaml",
]
