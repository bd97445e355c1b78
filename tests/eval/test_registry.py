"""The evaluator registry and the `dinosys eval` command line generated from it."""

from __future__ import annotations

import dataclasses
import shlex

import pytest

from dinosys.errors import UserError
from dinosys.eval.cli import build_eval_parser, parse_request
from dinosys.eval.registry import evaluators, get_evaluator

NAMES = sorted(evaluators())


def test_builtin_evaluators_are_registered() -> None:
    assert {"knn", "linear"} <= set(NAMES)
    with pytest.raises(UserError, match="unknown evaluator 'nope'; one of .*knn"):
        get_evaluator("nope")


@pytest.mark.parametrize("name", NAMES)
def test_every_option_has_help_and_a_flag(name: str) -> None:
    evaluator = get_evaluator(name)
    assert evaluator.help and callable(evaluator.run)
    for f in dataclasses.fields(evaluator.config):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
    parser = build_eval_parser()
    sub = next(a for a in parser._actions if a.dest == "evaluator").choices[name]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert "--model" in flags and "--out" in flags


@pytest.mark.parametrize("name", NAMES)
def test_reproducing_command_parses_back_to_the_same_config(name: str, tmp_path) -> None:
    evaluator = get_evaluator(name)
    values = {}
    for f in dataclasses.fields(evaluator.config):
        if "file_example" in f.metadata:  # a file with content the evaluator accepts
            example = tmp_path / f"{f.name}.txt"
            example.write_text(f.metadata["file_example"])
            values[f.name] = str(example)
        elif f.metadata.get("path"):
            values[f.name] = str(tmp_path)
    cfg = evaluator.make_config(**values)
    changed = {}
    for f in dataclasses.fields(cfg):  # flip a few options away from their defaults
        value = getattr(cfg, f.name)
        if isinstance(value, bool):
            changed[f.name] = not value
        elif isinstance(value, int) and value > 1:
            changed[f.name] = value + 1
    cfg = dataclasses.replace(cfg, **changed)
    from dinosys.eval.cli import command_line

    words = shlex.split(command_line(name, "random:vit_tiny", cfg))
    assert words[:5] == ["dinosys", "eval", name, "--model", "random:vit_tiny"]
    request = parse_request(words[2:])
    assert request.evaluator == name and request.config == cfg


def test_make_config_names_unknown_and_missing_options(tmp_path) -> None:
    knn = get_evaluator("knn")
    with pytest.raises(UserError, match=r"no option\(s\) \['kk'\]"):
        knn.make_config(train=str(tmp_path), val=str(tmp_path), kk=3)
    with pytest.raises(UserError, match="needs"):
        knn.make_config(train=str(tmp_path))
    with pytest.raises(UserError, match="--val /no/such: not found"):
        knn.make_config(train=str(tmp_path), val="/no/such")
    with pytest.raises(UserError, match="--k needs positive"):
        knn.make_config(train=str(tmp_path), val=str(tmp_path), k=[0])


def test_usage_errors_become_one_line() -> None:
    with pytest.raises(UserError, match="required: --model"):
        parse_request(["knn", "--train", "a", "--val", "b"])
    with pytest.raises(UserError, match="invalid choice: 'linearr'"):
        parse_request(["linearr", "--model", "m"])
