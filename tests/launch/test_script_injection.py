"""No value of a submission reaches the sbatch script unchecked (issue 18, item 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.jobs import prepare_jobs
from launch.params import sbatch_script, slurm_parameters
from launch.submit import build_parser

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.py"


def _submit(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *argv], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def _one_line_error(res: subprocess.CompletedProcess, needle: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert "#SBATCH" not in res.stdout  # no script was printed


def _yaml(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "hostile.yaml"
    path.write_text(f"_base_: mnist_tiny_cpu\nname: {name}\nmax_steps: 4\n")
    return path


@pytest.mark.parametrize("name", ['"demo\\ntouch PWNED #"', '"../escaped"', '"a b"', '".."'])
def test_config_name_must_be_a_safe_name(tmp_path: Path, name: str) -> None:
    res = _submit("train", "--dry-run", "--", str(_yaml(tmp_path, name)), cwd=tmp_path)
    _one_line_error(res, "not a valid name")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path.parent / "escaped-%j").exists()


@pytest.mark.parametrize("flag, value, needle", [
    ("--name", "x\ntouch PWNED", "not a valid name"),
    ("--comment", "ok\ntouch PWNED #", "control character"),
    ("--partition", "debug\rtouch PWNED", "control character"),
    ("--account", "a\tb", "control character"),
])
def test_flags_with_control_characters_are_refused(tmp_path: Path, flag, value, needle) -> None:
    res = _submit("train", flag, value, "--dry-run", "--", "mnist_tiny_cpu", cwd=tmp_path)
    _one_line_error(res, needle)


def test_out_with_a_newline_is_refused(tmp_path: Path) -> None:
    res = _submit("train", "--out", str(tmp_path / "run\ntouch PWNED #"), "--dry-run", "--",
                  "mnist_tiny_cpu", cwd=tmp_path)
    _one_line_error(res, "control character")


def test_every_script_header_line_is_an_sbatch_flag(tmp_path: Path) -> None:
    """With valid values, the header holds only ``#SBATCH`` lines: nothing else gets executed."""
    [job] = prepare_jobs("train", ["mnist_tiny_cpu"])
    args = build_parser().parse_args(["train", "--comment", "it's; $(touch X) `y`",
                                      "--name", "ok.name-1_2"])
    script = sbatch_script(slurm_parameters(args, job), tmp_path / "it's here" / "submitit")
    header, command = script.split("# command\n")
    body = [line for line in header.splitlines()[3:] if line.strip()]
    assert body and all(line.startswith("#SBATCH --") for line in body), header
    assert len([line for line in command.splitlines() if line.strip()]) == 2, command
    res = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
