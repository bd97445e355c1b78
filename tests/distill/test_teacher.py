"""Teacher loading from every source: run/checkpoint (with heads), export, timm, HF, file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dinosys.export
from dinosys.distill.teacher import load_teacher, place_teacher
from dinosys.errors import UserError
from dinosys.export.exporter import export_model


def _images(n: int = 3, size: int = 28) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_run_teacher_has_heads_and_matches_the_export(teacher_run: Path) -> None:
    teacher = load_teacher(teacher_run)
    assert teacher.has_heads and teacher.kind == "checkpoint"
    assert teacher.dino_head.n_prototypes == 64 and teacher.ibot_head is teacher.dino_head
    x = _images()
    ref = dinosys.export.load(teacher_run / "export" / "teacher")(x)
    out = teacher.encode(x)
    torch.testing.assert_close(out["cls"], ref["x_norm_clstoken"])
    torch.testing.assert_close(out["patches"], ref["x_norm_patchtokens"])
    assert out["cls_bottleneck"].shape == (3, 16)
    assert out["patch_bottleneck"].shape == (3, 4, 16)
    torch.testing.assert_close(out["cls_bottleneck"].norm(dim=-1), torch.ones(3))
    # frozen, stays in eval mode, same fingerprint from the checkpoint path itself
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.backbone.training
    ckpt = sorted((teacher_run / "checkpoints").glob("step_*"))[-1]
    assert load_teacher(ckpt).fingerprint == teacher.fingerprint
    assert teacher.describe()["sha256"] == teacher.fingerprint


@pytest.mark.parametrize("layout", ["export", "timm", "hf", "file"])
def test_backbone_only_sources(teacher_run: Path, tmp_path: Path, layout: str) -> None:
    out = tmp_path / "exp"
    export_model(teacher_run / "export" / "teacher", out,
                 ["timm", "hf"] if layout in ("timm", "hf") else [])
    ref_model = dinosys.export.load(out)
    path = {"export": out, "timm": out / "timm", "hf": out / "hf"}.get(layout)
    if layout == "file":
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in ref_model.state_dict().items()}, str(path))
        with pytest.raises(UserError, match="teacher.arch"):
            load_teacher(path)
        teacher = load_teacher(path, arch="vit_tiny", num_heads=2)
    else:
        teacher = load_teacher(path)
    assert not teacher.has_heads and teacher.kind == ("state_dict" if layout == "file" else layout)
    x = _images()
    ref = ref_model(x)
    got = teacher.encode(x)
    torch.testing.assert_close(got["cls"], ref["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["patches"], ref["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)
    assert teacher.patch_size == 14 and teacher.embed_dim == 32


def test_bad_teacher_paths(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        load_teacher(tmp_path / "empty")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read teacher weights"):
        load_teacher(bad, arch="vits14")


def test_place_teacher_dtype(teacher_run: Path) -> None:
    teacher = place_teacher(load_teacher(teacher_run / "export" / "teacher"),
                            torch.device("cpu"), "bf16")
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert teacher.encode(_images())["cls"].dtype == torch.bfloat16
