"""`--help` texts give defaults: every launcher flag, `dinosys eval knn` (k, random: models)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from launch.submit import SIGNAL_DELAY_S, build_parser

REPO = Path(__file__).resolve().parents[1]


def test_every_launcher_flag_states_its_default() -> None:
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 20
    missing = [a.option_strings[0] for a in flags if "default" not in (a.help or "")]
    assert not missing, f"flags whose --help gives no default: {missing}"
    text = parser.format_help()
    for needle in ("default: 60", "default: 3", f"default: {SIGNAL_DELAY_S}", "default: 1",
                   "default: runs/<name>-<job id>"):
        assert needle in " ".join(text.split()), needle


def test_eval_knn_help_gives_k_and_random_models() -> None:
    res = subprocess.run([sys.executable, "-m", "dinosys.cli", "eval", "knn", "--help"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "neighbour counts (default: 10 20)" in text
    assert "random:RUN" in text and "random:ARCH[:IMG_SIZE]" in text


def test_export_help_gives_formats_and_default() -> None:
    import dinosys.export.exporter  # noqa: F401 - registers the backbone formats
    from dinosys.cli import build_parser as dinosys_parser
    from dinosys.export.registry import EXPORTERS

    sub = next(a for a in dinosys_parser()._actions if a.dest == "command")
    text = " ".join(sub.choices["export"].format_help().split())
    listed = text.split("comma list of formats:")[1].split(";")[0]
    assert all(f" {name}" in listed for name in ["native", *EXPORTERS]), (listed, list(EXPORTERS))
    assert "(default: native)" in text
