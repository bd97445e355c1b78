"""The `dinosys` CLI convention, run as real processes: help works, bad input is one line + exit 2,
capabilities not built yet are one line + exit 3, `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinosys.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "dinosys"


def dinosys(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter (`python -m dinosys.cli`)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dinosys.cli", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, env=env, timeout=120)


def assert_one_line_error(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    err = res.stderr.strip()
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("dinosys: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.extend(_command_paths(sub, (*prefix, name)))
    return paths


def _eval_paths() -> list:
    """`dinosys eval EVALUATOR`: parsed by the evaluator registry's own parser."""
    from dinosys.eval.cli import build_eval_parser

    return [("eval", *p) for p in _command_paths(build_eval_parser())[1:]]


COMMANDS = _command_paths(build_parser()) + _eval_paths()


def test_every_command_is_listed() -> None:
    names = {" ".join(p) for p in COMMANDS}
    assert {"data builtin", "train", "clip", "distill", "eval knn", "eval linear", "export",
            "demo"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "dinosys")
def test_help_exits_zero(path: tuple[str, ...]) -> None:
    res = dinosys(*path, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: dinosys {' '.join(path)}".rstrip()) and res.stderr == ""


def test_console_script_is_installed() -> None:
    res = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "usage: dinosys" in res.stdout


def _unbuilt(command: str) -> bool:
    from dinosys.train.tasks import task_for_command

    return task_for_command(command) is None


@pytest.mark.parametrize("args", [
    pytest.param(("clip", "x"), marks=pytest.mark.skipif(not _unbuilt("clip"), reason="built")),
])
def test_not_built_yet_exits_three(args: tuple[str, ...]) -> None:
    assert_one_line_error(dinosys(*args), 3, "not built yet")


def test_distill_bad_config_exits_two() -> None:
    assert_one_line_error(dinosys("distill", "mnist_demo_cpu", "loss.mode=bogus"), 2, "loss.mode")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A valid tiny train config; the error-path tests fail before training would start."""
    path = tmp_path / "tiny.yaml"
    path.write_text("name: tiny\nmodel:\n  arch: vit_tiny\noptim:\n  base_lr: 0.001\n")
    return path


def test_override_typo_suggests_the_key(tiny: Path, tmp_path: Path) -> None:
    err = assert_one_line_error(dinosys("train", str(tiny), "optim.base_lrr=1", cwd=tmp_path), 2,
                                "optim.base_lrr")
    assert "did you mean 'optim.base_lr'?" in err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_file_typo_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("optim:\n  warmup_epoch: 3\n")
    assert_one_line_error(dinosys("train", str(bad), cwd=tmp_path), 2, "optim.warmup_epoch",
                          "typo.yaml", "did you mean 'optim.warmup_epochs'?")


@pytest.mark.parametrize(("overrides", "needles"), [
    (["optim.base_lr=abc"], ["optim.base_lr", "wrong type"]),
    (["optim.epochs=1.5"], ["optim.epochs", "wrong type"]),
    (["data.sources=[{weight: 1}]"], ["data.sources[0].path", "required"]),
    (["model.attn_backend=flash"], ["model.attn_backend", "'flash'"]),
    (["optim"], ["key=value"]),
    (["--out", "somewhere", "seed=x"], ["'seed'"]),  # overrides after an option
])
def test_bad_overrides_exit_two(tiny: Path, tmp_path: Path, overrides: list[str],
                                needles: list[str]) -> None:
    assert_one_line_error(dinosys("train", str(tiny), *overrides, cwd=tmp_path), 2, *needles)


def test_bad_config_files_exit_two(tmp_path: Path) -> None:
    (tmp_path / "syntax.yaml").write_text("optim: [1\n")
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    cases = [
        ("missing.yaml", ["config file not found", "missing.yaml"]),
        (str(tmp_path / "missing.yaml"), ["config file not found"]),
        (str(tmp_path), ["is a directory"]),
        ("syntax.yaml", ["cannot parse", "syntax.yaml", "line 2"]),
        ("a.yaml", ["include each other", "a.yaml -> b.yaml -> a.yaml"]),
        ("binary.yaml", ["cannot read config file", "binary.yaml"]),
    ]
    for config, needles in cases:
        assert_one_line_error(dinosys("train", config, cwd=tmp_path), 2, *needles)


def test_debug_shows_the_traceback(tiny: Path, tmp_path: Path) -> None:
    res = dinosys("--debug", "train", str(tiny), "optim.base_lrr=1", cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr
    assert "ConfigError" in res.stderr and "optim.base_lrr" in res.stderr


def test_usage_errors_exit_two(tmp_path: Path) -> None:
    for args in (("data", "builtin"), ("bogus",), ("train",), ("train", "x.yaml", "--bogus")):
        res = dinosys(*args, cwd=tmp_path)
        assert res.returncode == 2 and "usage: dinosys" in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr


@pytest.mark.parametrize("text, needle", [("x", "must look like i/n"), ("2/2", "0 <= i < n"),
                                          ("-1/4", "0 <= i < n"), ("1/0", "0 <= i < n")])
def test_a_bad_part_is_one_line(text: str, needle: str, tmp_path: Path) -> None:
    """`--part i/n` (dinosys pipeline, and dinosys-curate through the same parse_part)."""
    from dinosys.cli import parse_part
    from dinosys.errors import UserError

    assert parse_part("3/4") == (3, 4) and parse_part(None) is None
    with pytest.raises(UserError, match=needle):
        parse_part(text)
    res = dinosys("pipeline", "demo", "--out", str(tmp_path / "p"), "--stage", "curate",
                  f"--part={text}", cwd=tmp_path)
    assert_one_line_error(res, 2, needle)
    assert not (tmp_path / "p").exists()
