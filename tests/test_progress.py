"""Progress output: a tqdm bar on a terminal, plain periodic lines in a log (Slurm, CI)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from dinosys.progress import LineProgress, progress_bar


def test_line_progress_writes_a_line_every_interval_not_every_update() -> None:
    out = io.StringIO()
    bar = LineProgress(total=1000, desc="train", unit="step", every_s=3600, file=out)
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix(loss="0.412")
    assert out.getvalue() == ""  # the interval has not passed: nothing yet
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()
    assert lines[0].startswith("train: 1000/1000 step (100%)") and lines[0].endswith("loss=0.412")


def test_line_progress_every_zero_seconds_and_iteration() -> None:
    out = io.StringIO()
    items = list(LineProgress(range(5), desc="x", every_s=0, file=out))
    assert items == [0, 1, 2, 3, 4]
    assert [line.split(" ")[1] for line in out.getvalue().splitlines()] == \
        ["1/5", "2/5", "3/5", "4/5", "5/5", "5/5"]


def test_a_pipe_gets_plain_lines_not_carriage_returns() -> None:
    """stderr redirected (as in a Slurm log): no tqdm stream, a few plain lines."""
    code = ("from dinosys.progress import progress_bar\n"
            "bar = progress_bar(total=3000, desc='train', unit='step')\n"
            "[bar.update(1) for _ in range(3000)]\nbar.close()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1],
                         env={"DINOSYS_PROGRESS_EVERY_S": "3600",
                              "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr
    assert res.stderr.splitlines()[-1].startswith("train: 3000/3000 step (100%)")
    assert len(res.stderr.splitlines()) == 1
    assert progress_bar(total=3, disable=True) is not None
