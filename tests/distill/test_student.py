"""One student's objective against a real (tiny) teacher: heads and features modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinosys.distill.config import DistillLossConfig, StudentConfig
from dinosys.distill.student import Student, masked_positions
from dinosys.distill.teacher import load_teacher
from dinosys.losses import sinkhorn_knopp
from dinosys.models.heads import HeadConfig
from dinosys.models.vit import BackboneConfig


def _student_cfg(width: int = 24) -> StudentConfig:
    return StudentConfig(name="s", model=BackboneConfig(
        arch="vit_tiny", img_size=28, patch_size=14, embed_dim=width, depth=1, num_heads=2,
        layerscale_init=None), heads=HeadConfig(hidden_dim=32, bottleneck_dim=16))


def _crops(n: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"global_crops": torch.randn(2 * n, 3, 28, 28, generator=gen),
            "local_crops": torch.empty(0),
            "masks": torch.rand(2 * n, 4, generator=gen) < 0.5}


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_head_mode_trains_on_the_teachers_normalised_head_outputs(teacher_run: Path,
                                                                   centering: str) -> None:
    teacher = load_teacher(teacher_run)
    loss_cfg = DistillLossConfig(mode="heads", centering=centering)
    torch.manual_seed(0)
    student = Student(_student_cfg(), teacher, loss_cfg, "heads")
    # heads take the teacher's prototype count, the student's own MLP sizes
    assert student.modules["dino_head"].n_prototypes == teacher.dino_head.n_prototypes == 64
    assert student.modules["dino_head"].bottleneck_dim == 16
    crops = _crops()
    t_out = teacher.encode(crops["global_crops"])
    out = student.forward_loss(crops, t_out, teacher_temp=0.07)
    out["loss"].backward()
    grads = {n: p.grad for n, p in student.modules.named_parameters()}
    assert grads.pop("backbone.mask_token") is None  # no student masking by default
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert not any(p.grad is not None for p in teacher.parameters())
    # the DINO targets are exactly the teacher's normalised prototype scores
    logits = teacher.dino_head.last_layer(t_out["cls_bottleneck"])
    if centering == "sinkhorn_knopp":
        want = sinkhorn_knopp(logits, 0.07, 3)
    else:
        want = torch.softmax(logits / 0.07, dim=-1)  # first step: zero centre
    fresh = Student(_student_cfg(), teacher, loss_cfg, "heads")
    got, _ = fresh.targets(t_out["cls_bottleneck"], t_out["patch_bottleneck"].flatten(0, 1), 0.07)
    torch.testing.assert_close(got, want)
    if centering == "centering":
        assert fresh.extra_state()["dino_center"].abs().sum() > 0  # updated by the call


def test_feature_mode_with_projection(teacher_run: Path) -> None:
    teacher = load_teacher(teacher_run / "export" / "teacher")
    student = Student(_student_cfg(width=24), teacher, DistillLossConfig(mode="features",
                                                                         koleo_weight=0.0),
                      "features")
    assert "proj" in student.modules and student.modules["proj"].weight.shape == (32, 24)
    crops = _crops()
    out = student.forward_loss(crops, teacher.encode(crops["global_crops"]), 0.07)
    assert set(out) == {"loss", "cls_loss", "patch_loss", "koleo_loss"}
    out["loss"].backward()
    assert student.modules["proj"].weight.grad.abs().sum() > 0
    same = Student(_student_cfg(width=32), teacher, DistillLossConfig(mode="features"),
                   "features")
    assert "proj" not in same.modules


def test_ibot_positions_without_and_with_student_masking() -> None:
    masks = torch.tensor([[True, False, False, True], [False, False, False, False]])
    idx, w = masked_positions(masks, mask_student=False)
    assert idx.tolist() == list(range(8)) and torch.allclose(w, torch.full((8,), 0.25))
    idx, w = masked_positions(masks, mask_student=True)
    assert idx.tolist() == [0, 3] and torch.allclose(w, torch.tensor([0.5, 0.5]))


def test_head_mode_with_features_and_same_view_dino(teacher_run: Path) -> None:
    """loss.feature_weight adds the feature terms (and the projection) to the head objective;
    loss.dino_same_view averages the cross-view DINO pairs with the same-view ones."""
    from dinosys.losses.dino import dino_loss
    from dinosys.losses.soft_ce import soft_cross_entropy

    teacher = load_teacher(teacher_run)
    crops = _crops()
    t_out = teacher.encode(crops["global_crops"])
    base = DistillLossConfig(mode="heads", koleo_weight=0.0)
    torch.manual_seed(0)
    plain = Student(_student_cfg(), teacher, base, "heads")
    torch.manual_seed(0)
    both = Student(_student_cfg(), teacher,
                   DistillLossConfig(mode="heads", koleo_weight=0.0, feature_weight=0.5,
                                     dino_same_view=True), "heads")
    assert "proj" in both.modules and "proj" not in plain.modules
    a = plain.forward_loss(crops, t_out, 0.07)
    b = both.forward_loss(crops, t_out, 0.07)
    assert {"cls_loss", "patch_loss"} <= set(b) and "cls_loss" not in a
    torch.testing.assert_close(b["ibot_loss"], a["ibot_loss"])  # same weights, same targets
    # the DINO term: the mean of the cross-view loss and the same-view cross-entropy
    g = crops["global_crops"]
    cls_logits = both.modules["dino_head"](both.backbone(g)["x_norm_clstoken"])
    probs = torch.softmax(teacher.dino_head.last_layer(t_out["cls_bottleneck"]) / 0.07, -1)
    cross = dino_loss(cls_logits, probs, n_global_crops=2, student_temp=0.1).loss
    same = soft_cross_entropy(cls_logits.reshape(2, -1, 64), probs.reshape(2, -1, 64), 0.1)
    torch.testing.assert_close(b["dino_loss"], 0.5 * (cross + same.mean()), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        b["loss"], b["dino_loss"] + b["ibot_loss"] + 0.5 * (b["cls_loss"] + b["patch_loss"]),
        rtol=1e-4, atol=1e-5)
    b["loss"].backward()
    assert both.modules["proj"].weight.grad.abs().sum() > 0
