"""A config name cannot move the default run folder out of runs/ (issue 18, item 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinosys.errors import UserError
from dinosys.names import check_name, check_script_value

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", "a b", "x\ny", "ü"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(UserError, match="not a valid name"):
        check_name(name, "config name")


def test_safe_names_and_values_pass() -> None:
    assert check_name("vitl14_reg-v2.1", "name") == "vitl14_reg-v2.1"
    assert check_script_value("it's $(fine) `quoted`", "--comment") == "it's $(fine) `quoted`"
    with pytest.raises(UserError, match="control character"):
        check_script_value("a\nb", "--comment")


@pytest.mark.parametrize("name", ["../escaped", '"demo\\ntouch PWNED #"'])
def test_train_default_run_folder_stays_under_runs(tmp_path: Path, name: str) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    config = tmp_path / "hostile.yaml"
    config.write_text(f"_base_: mnist_tiny_cpu\nname: {name}\nmax_steps: 1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "dinosys.cli", "train", str(config)], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    err = res.stderr.strip()
    assert "\n" not in err and "not a valid name" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.yaml", "work"]
    assert list(cwd.iterdir()) == []  # nothing created, not even runs/
