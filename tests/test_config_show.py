"""`dinosys config show RECIPE [--diff]` / `--task NAME`: every key with its type, default,
value and help text (from the schema dataclasses); `dinosys train --help` lists the recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dinosys.cli import main
from dinosys.config import load_config, to_dict
from dinosys.config.describe import describe
from dinosys.train.tasks import TASKS, load_task_config

REPO = Path(__file__).resolve().parents[1]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(capsys, *argv: str) -> tuple[list[str], dict]:
    assert main(["config", "show", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    return lines, json.loads(lines[-1])


def test_show_lists_every_key_with_type_default_value_and_help(capsys) -> None:
    lines, summary = _show(capsys, "vitl14")
    assert lines[0].split() == ["key", "type", "default", "value", "help"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    flat = _flat(to_dict(load_task_config("vitl14", [])))
    assert set(rows) == set(flat) and summary["keys"] == len(flat) > 100
    assert summary["task"] == "ssl" and summary["schema"] == "SSLConfig"
    assert re.fullmatch(r"model\.arch\s+str\s+vits14\s+vitl14\s+vit_tiny, vits14, .*",
                        rows["model.arch"])
    assert re.fullmatch(r"optim\.base_lr\s+float\s+0\.004\s+0\.0002\s+peak lr .*",
                        rows["optim.base_lr"])


def test_diff_shows_exactly_what_the_recipe_and_overrides_change(capsys) -> None:
    lines, summary = _show(capsys, "vitl14", "optim.epochs=7", "--diff")
    shown = {line.split()[0]: line.split() for line in lines[1:-1]}
    cfg = load_task_config("vitl14", ["optim.epochs=7"])
    now = _flat(to_dict(cfg))
    default = _flat(to_dict(load_config(type(cfg), None, [])))
    assert set(shown) == {k for k in now if now[k] != default[k]}
    assert summary["shown"] == summary["changed"] == len(shown)
    assert shown["optim.epochs"][2:4] == ["100", "7"]


def test_every_key_of_every_task_schema_has_a_help_text() -> None:
    schemas = {name: cls.config_class for name, cls in TASKS.items()}
    assert "distill" in schemas
    for name, schema in schemas.items():
        missing = [r.key for r in describe(schema) if not r.help]
        assert not missing, f"task {name}: keys without help text: {missing}"


def test_a_distill_recipe_is_shown_with_its_schema(capsys) -> None:
    lines, summary = _show(capsys, "mnist_demo_cpu", "--diff")
    assert summary["schema"] == "DistillConfig" and summary["task"] == "distill"
    assert any(line.startswith("teacher.path ") for line in lines)


def test_task_defaults_and_errors(capsys) -> None:
    lines, summary = _show(capsys, "--task", "toy")
    assert lines[0].split() == ["key", "type", "default", "help"] and summary["task"] == "toy"
    assert main(["config", "show"]) == 2
    assert "needs a RECIPE" in capsys.readouterr().err
    assert main(["config", "show", "no_such_recipe"]) == 2


def test_training_command_help_lists_the_shipped_recipes(capsys) -> None:
    for command in ("train", "clip", "distill"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        recipes = sorted(p.stem for p in (REPO / "configs" / command).glob("*.yaml"))
        assert f"shipped recipes (configs/{command}/): {', '.join(recipes) or '(none yet)'}." \
            in text
