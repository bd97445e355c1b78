"""Real short training runs: run directory contents, exact resume, non-finite steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dinosys.distributed.sharded_checkpoint import load_backbone_state
from dinosys.errors import UserError
from dinosys.train.run import run_train


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_writes_run_directory(tiny_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = run_train(tiny_cfg("max_steps=4", "checkpoint.every_n_steps=2"), run)
    assert summary["status"] == "finished" and summary["step"] == 4
    assert (run / "config.yaml").is_file()
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("dino_loss", "ibot_loss", "koleo_loss", "lr", "wd", "momentum", "teacher_temp",
                "images_per_s", "mfu", "data_wait_frac", "peak_mem_gib", "teacher_entropy",
                "teacher_kl_uniform"):
        assert key in records[-1], key
    assert all(isinstance(r["loss"], float) for r in records)
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000002", "step_00000004"]
    export = run / "export" / "teacher"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    from dinosys.export import load

    exported = load(export)
    ckpt = load_backbone_state(run / "checkpoints" / "step_00000004")
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, ckpt[name], msg=name)


@pytest.mark.slow
def test_resume_gives_the_same_run(tiny_cfg, tmp_path: Path) -> None:
    """6 steps straight == 3 steps, resume from the checkpoint, 3 more steps."""
    cfg = tiny_cfg("max_steps=6", "checkpoint.every_n_steps=3", "checkpoint.keep_last=3")
    full = tmp_path / "full"
    run_train(cfg, full)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    shutil.rmtree(resumed / "export")
    (resumed / "checkpoints" / "latest").write_text("step_00000003\n")
    summary = run_train(cfg, resumed)
    assert summary["step"] == 6
    a = {r["step"]: r["loss"] for r in read_metrics(full) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # re-logged steps replaced, not duplicated
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    wa = load_backbone_state(full / "checkpoints" / "step_00000006", prefix="student")
    wb = load_backbone_state(resumed / "checkpoints" / "step_00000006", prefix="student")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_nonfinite_step_is_skipped_and_counted(tiny_cfg, tmp_path: Path) -> None:
    summary = run_train(tiny_cfg("max_steps=3", "debug_nonfinite_steps=[1]",
                                 "checkpoint.every_n_steps=0"), tmp_path / "run")
    assert summary["status"] == "finished" and summary["step"] == 3
    assert summary["nonfinite_steps"] == 1
    records = read_metrics(tmp_path / "run")
    skipped = [r for r in records if "consecutive_nonfinite" in r]
    assert len(skipped) == 1 and skipped[0]["step"] == 1
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_stops_after_too_many_nonfinite_steps(tiny_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_cfg("max_steps=6", "checkpoint.every_n_steps=2", "max_consecutive_nonfinite=3",
                   "debug_nonfinite_steps=[3,3,3]")
    with pytest.raises(UserError, match="3 consecutive steps with a NaN/inf") as info:
        run_train(cfg, run)
    assert "step_00000002" in str(info.value)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000002"]
    assert not (run / "export").exists()


def test_missing_builtin_knn_folders_are_built(tiny_cfg, tmp_path: Path) -> None:
    """A recipe whose periodic kNN points at the embedded MNIST gets it built on a fresh
    machine (the training data alone is not enough to trigger the build)."""
    from dinosys.distributed.env import DistEnv
    from dinosys.train.run import ensure_builtin_sources

    root = tmp_path / "data" / "builtin"
    cfg = tiny_cfg("eval.knn_every_n_steps=5", f"eval.knn_train={root / 'mnist' / 'train'}",
                   f"eval.knn_val={root / 'mnist' / 'val'}", f"data.builtin_root={root}")
    ensure_builtin_sources(cfg, DistEnv())
    assert len(list((root / "mnist" / "val").rglob("*.png"))) == 1000
    cfg = tiny_cfg("eval.knn_every_n_steps=5", f"eval.knn_train={tmp_path / 'nowhere'}",
                   f"eval.knn_val={root / 'mnist' / 'val'}")
    with pytest.raises(UserError, match="eval.knn_train not found"):
        ensure_builtin_sources(cfg, DistEnv())


def test_periodic_knn_runs_through_the_evaluator_registry(tiny_cfg, small_digits: Path,
                                                         tmp_path: Path, monkeypatch) -> None:
    """The SSL config's eval.knn_* keys become the registry's kNN (the code of `dinosys eval
    knn`): logged as knn/top1_k<k> every N steps, its folders decoded once for all calls, the
    last result in the summary and the model card."""
    import dinosys.eval.images as images

    data = small_digits
    loads: list[Path] = []
    load = images._load_image_folder
    monkeypatch.setattr(images, "_load_image_folder",
                        lambda root, *a: loads.append(Path(root)) or load(root, *a))
    run = tmp_path / "run"
    summary = run_train(tiny_cfg("max_steps=4", "eval.knn_every_n_steps=2", "eval.knn_k=[3]",
                                 f"eval.knn_train={data / 'train'}",
                                 f"eval.knn_val={data / 'val'}"), run)
    evals = [r for r in read_metrics(run) if "knn/top1_k3" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0.0 <= r["knn/top1_k3"] <= 1.0 for r in evals)
    assert summary["knn_top1"] == {"3": evals[-1]["knn/top1_k3"]}
    assert sorted(loads) == [data / "train", data / "val"]  # decoded once, used twice
    card = (run / "export" / "teacher" / "README.md").read_text()
    assert "knn_top1_during_training" in card
