"""Bad distillation input: one line, exit code 2, before any work (no run directory)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dinosys.data.augment import CropConfig
from dinosys.distill.config import DistillConfig, DistillLossConfig, StudentConfig, TeacherConfig
from dinosys.distill.task import DistillTask
from dinosys.errors import UserError
from dinosys.models.vit import BackboneConfig

from .conftest import run_cli


def _student(name: str = "s", **model) -> StudentConfig:
    arch = dict(arch="vit_tiny", img_size=28, patch_size=14, embed_dim=16, depth=1, num_heads=2,
                layerscale_init=None)
    arch.update(model)
    return StudentConfig(name=name, model=BackboneConfig(**arch))


def _task(teacher: Path, students: list[StudentConfig], mode: str = "auto", **crops):
    crop_cfg = CropConfig(**{"global_size": 28, "local_size": 14, "n_local": 0, **crops})
    return DistillTask(DistillConfig(teacher=TeacherConfig(path=str(teacher)), students=students,
                                     loss=DistillLossConfig(mode=mode), crops=crop_cfg))


def test_head_mode_needs_a_teacher_with_heads(teacher_run: Path) -> None:
    with pytest.raises(UserError, match="has no DINO/iBOT heads .*loss.mode=features"):
        _task(teacher_run / "export" / "teacher", [_student()], mode="heads")
    assert _task(teacher_run / "export" / "teacher", [_student()]).mode == "features"  # auto
    assert _task(teacher_run, [_student()]).mode == "heads"


def test_patch_size_and_normalisation_must_match(teacher_run: Path) -> None:
    with pytest.raises(UserError, match="patch size 7 but the teacher has 14"):
        _task(teacher_run, [_student(patch_size=7)])
    with pytest.raises(UserError, match="expects images normalised with mean"):
        _task(teacher_run, [_student()], mean=[0.5, 0.5, 0.5])
    with pytest.raises(UserError, match="not a multiple of the teacher's patch size 14"):
        _task(teacher_run, [_student(img_size=30)], global_size=30)


def test_rank_ranges_and_names(teacher_run: Path) -> None:
    with pytest.raises(UserError, match="overlap"):
        _task(teacher_run, [StudentConfig(name="a", model=_student().model, ranks=[0, 0]),
                            StudentConfig(name="b", model=_student().model, ranks=[0, 0])])
    with pytest.raises(UserError, match="unique"):
        _task(teacher_run, [_student("a"), _student("a")])


def test_student_larger_than_teacher_warns(teacher_run: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dinosys.distill"):
        _task(teacher_run, [_student(embed_dim=64, depth=3)])
    assert "larger than its teacher" in caplog.text


def test_cli_exit_2_one_line_and_no_run_directory(teacher_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run_cli("distill", "mnist_demo_cpu", "--out", str(out),
                  f"teacher.path={teacher_run / 'export' / 'teacher'}", "loss.mode=heads")
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no DINO/iBOT heads" in lines[0], res.stderr
    assert not out.exists()
    res = run_cli("distill", "mnist_demo_cpu", "--out", str(out), "teacher.path=/no/such")
    assert res.returncode == 2 and "does not exist" in res.stderr and not out.exists()
