"""``log.tensorboard=true``: the run's scalars also go to TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinosys.train.run import run_train

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is in the test extra: pip install -e .[test]")


def test_tensorboard_event_files_hold_the_logged_scalars(tiny_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_cfg("max_steps=3", "log.tensorboard=true", "checkpoint.every_n_steps=0",
                   "data.batch_size_per_gpu=4")
    summary = run_train(cfg, run)
    assert summary["status"] == "finished"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under RUN/tensorboard"

    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss", "dino_loss", "ibot_loss", "lr", "images_per_s"):
        assert tag in tags, tag
    jsonl = {r["step"]: r for r in (json.loads(line) for line in
                                    (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in r}
    scalars = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(scalars) == sorted(jsonl) == [1, 2, 3]
    for step, value in scalars.items():
        assert value == pytest.approx(jsonl[step]["loss"], rel=1e-6)  # float32 in the event file
    assert "step" not in tags  # the x axis, not a scalar


def test_tensorboard_off_writes_no_event_files(tiny_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_train(tiny_cfg("max_steps=1", "checkpoint.every_n_steps=0",
                       "data.batch_size_per_gpu=4"), run)
    assert not (run / "tensorboard").exists()


def test_missing_tensorboard_warns_and_keeps_the_jsonl(tmp_path: Path, monkeypatch,
                                                       caplog) -> None:
    import sys

    from dinosys.train.metrics import MetricsWriter

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises
    with caplog.at_level("WARNING", logger="dinosys.train.metrics"):
        writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    assert "tensorboard is not installed" in caplog.text
    writer.write({"step": 1, "loss": 2.5})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5}
    assert not (tmp_path / "tensorboard").exists()


def test_resumed_run_replaces_the_steps_logged_after_the_checkpoint(tmp_path: Path) -> None:
    """A killed run logged steps 1-3 but checkpointed at 2; the resumed run logs 3 again.
    TensorBoard must show each step once, with the resumed values."""
    from dinosys.train.metrics import MetricsWriter

    first = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    for step in (1, 2, 3):
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    for step in (3, 4):
        resumed.write({"step": step, "loss": 10.0 * step})
    resumed.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert points == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
