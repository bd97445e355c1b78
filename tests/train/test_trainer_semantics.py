"""What the trainer really does in a step, checked against values computed independently of it:
the teacher temperature it uses, the centre update, the last-layer freeze and the iBOT per-image
weighting on a patch grid where images have different numbers of masked patches."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import dinosys.train.tasks.ssl as ssl_task
from dinosys.data.multicrop import build_ssl_loader
from dinosys.distributed.env import DistEnv
from dinosys.losses.normalize import Centering
from dinosys.train.loop import Trainer
from dinosys.train.tasks.ssl import SSLConfig, SSLTask

B = 4  # images per batch (8 global crops)
PLAIN = ["model.drop_path_rate=0", "dist.param_dtype=fp32", f"data.batch_size_per_gpu={B}",
         "checkpoint.every_n_steps=0", "max_steps=20"]  # the trainer below runs 20 steps


def make_trainer(cfg: SSLConfig, run_dir: Path) -> tuple[Trainer, list[dict]]:
    """A trainer on the CPU and the first 4 batches of the real loader."""
    loader = build_ssl_loader(cfg, 0, 1, patch_size=cfg.model.patch_size)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    torch.manual_seed(1234)
    task = SSLTask(cfg, DistEnv())
    return Trainer(task, loader, cfg, DistEnv(), run_dir, total_steps=20, total_batch=B), batches


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_trainer_uses_the_scheduled_teacher_temperature(tiny_cfg, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # warm-up over 2 steps (1 "epoch" of 2 iterations): 0.04, 0.055, then 0.07
    cfg = tiny_cfg(*PLAIN, "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07",
                   "loss.warmup_teacher_temp_epochs=1")
    trainer, batches = make_trainer(cfg, tmp_path / "run")
    used: list[float] = []
    real = Centering.softmax_centered

    def spy(self: Centering, logits: torch.Tensor, temp: float) -> torch.Tensor:
        used.append(temp)
        return real(self, logits, temp)

    monkeypatch.setattr(Centering, "softmax_centered", spy)
    for step, expected in ((0, 0.04), (1, 0.055), (2, 0.07), (3, 0.07)):
        used.clear()
        applied, logs = trainer.train_step([batches[step]], step)
        assert applied
        assert used == [pytest.approx(expected, abs=1e-12)] * 2, step  # DINO and iBOT targets
        assert logs["teacher_temp"] == pytest.approx(expected, abs=1e-12)


def test_sinkhorn_targets_use_the_scheduled_teacher_temperature(
        tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg(*PLAIN, "loss.centering=sinkhorn_knopp", "loss.warmup_teacher_temp=0.04",
                   "loss.teacher_temp=0.07", "loss.warmup_teacher_temp_epochs=1")
    trainer, batches = make_trainer(cfg, tmp_path / "run")
    used: list[float] = []
    real = ssl_task.sinkhorn_knopp

    def spy(logits: torch.Tensor, temp: float, *args, **kwargs) -> torch.Tensor:
        used.append(temp)
        return real(logits, temp, *args, **kwargs)

    monkeypatch.setattr(ssl_task, "sinkhorn_knopp", spy)
    for step, expected in ((0, 0.04), (1, 0.055), (2, 0.07)):
        used.clear()
        assert trainer.train_step([batches[step]], step)[0]
        assert used == [pytest.approx(expected, abs=1e-12)] * 2, step


def test_centre_after_one_step_is_the_dinov2_ema_of_the_teacher_logits(
        tiny_cfg, tmp_path: Path) -> None:
    """c <- 0.9 c + 0.1 mean(teacher CLS logits over the global crops), with the recipe's
    default momentum (mnist_tiny_cpu does not set it)."""
    cfg = tiny_cfg(*PLAIN)
    assert cfg.loss.center_momentum == 0.9
    trainer, batches = make_trainer(cfg, tmp_path / "run")
    task = trainer.task
    c0 = torch.randn(1, cfg.heads.n_prototypes, generator=torch.Generator().manual_seed(5))
    task.dino_center.center.copy_(c0)
    teacher = copy.deepcopy(task.teacher)  # the targets come from the teacher before the step
    with torch.no_grad():
        cls = teacher["backbone"](batches[0]["global_crops"])["x_norm_clstoken"]
        logits = teacher["dino_head"](cls)
    assert trainer.train_step([batches[0]], 0)[0]
    expected = 0.9 * c0 + 0.1 * logits.mean(0, keepdim=True)
    torch.testing.assert_close(task.dino_center.center, expected, rtol=1e-5, atol=1e-6)


def test_last_layer_is_frozen_for_the_first_epoch_then_trains(tiny_cfg, tmp_path: Path) -> None:
    # 1 "epoch" = 2 steps frozen; no lr warm-up, so every other head weight moves at step 0
    cfg = tiny_cfg(*PLAIN, "optim.freeze_last_layer_epochs=1", "optim.warmup_epochs=0")
    trainer, batches = make_trainer(cfg, tmp_path / "run")
    head = trainer.task.student["dino_head"]
    before = snapshot(head)
    last = [k for k in before if "last_layer" in k]
    mlp = [k for k in before if "last_layer" not in k]
    assert last and mlp

    def moved(names: list[str], ref: dict[str, torch.Tensor]) -> list[str]:
        now = snapshot(head)
        return [k for k in names if not torch.equal(now[k], ref[k])]

    params = dict(head.named_parameters())
    adam = trainer.optimizer.state
    for step in (0, 1):
        assert trainer.train_step([batches[step]], step)[0]
        assert moved(last, before) == [], step  # frozen: not even weight decay touches it
        assert moved(mlp, before) == mlp, step
        # DINOv2 drops the gradients: the frozen steps leave no AdamW moments behind either
        assert all(not adam[params[k]] for k in last), step
    assert trainer.train_step([batches[2]], 2)[0]  # the freeze is over
    assert moved(last, before) == last
    assert all(int(adam[params[k]]["step"]) == 1 for k in last)


def test_ibot_loss_weights_each_image_by_its_own_mask_count(
        tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a 4x4 grid the masked images hold different numbers of masked patches; the trainer's
    iBOT loss must be sum over images of (mean CE over that image's masked patches) / 2B."""
    cfg = tiny_cfg(*PLAIN, "data.batch_size_per_gpu=8", "model.patch_size=7",
                   "masking.mask_probability=1.0")
    trainer, batches = make_trainer(cfg, tmp_path / "run")
    batch = batches[0]
    masks = batch["masks"]
    counts = masks.sum(-1)
    assert masks.shape[1] == 16 and len(set(counts[counts > 0].tolist())) >= 3, counts
    seen: dict[str, torch.Tensor] = {}
    real = ssl_task.ibot_loss

    def spy(student: torch.Tensor, teacher: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen["student"], seen["teacher"] = student.detach().clone(), teacher.detach().clone()
        return real(student, teacher, *args, **kwargs)

    monkeypatch.setattr(ssl_task, "ibot_loss", spy)
    applied, logs = trainer.train_step([batch], 0)
    assert applied
    temp = cfg.loss.student_temp
    per_token = -(seen["teacher"] * torch.log_softmax(seen["student"].double() / temp, -1)).sum(-1)
    image = masks.flatten().nonzero().flatten() // masks.shape[1]
    n_images = masks.shape[0]
    per_image = [per_token[image == i].mean() for i in range(n_images) if counts[i] > 0]
    expected = float(torch.stack(per_image).sum() / n_images)
    assert logs["ibot_loss"] == pytest.approx(expected, rel=1e-5)
    unweighted = float(per_token.sum() / n_images)  # what a missing 1/n_masked would give
    assert abs(unweighted - expected) > 1e-2 * expected


def soft_ce(student_logits: torch.Tensor, target: torch.Tensor, temp: float) -> torch.Tensor:
    """Per-row -sum_k p_k log softmax(z / temp)_k, in float64."""
    return -(target.double() * torch.log_softmax(student_logits.double() / temp, -1)).sum(-1)


@pytest.mark.parametrize("separate_ibot_head", [False, True])
def test_ssl_objective_matches_a_direct_computation(tiny_cfg, tmp_path: Path,
                                                    separate_ibot_head: bool) -> None:
    """The logged DINO, iBOT, KoLeo and total losses of a trainer step, and both centres after
    it, recomputed from REFERENCE.md's formulas with copies of the models taken before the step:
    teacher on the unmasked global crops, centred softmax at the teacher temperature; student on
    every crop with iBOT masks on the global ones; DINO averaged over the (t, s != t) pairs;
    iBOT per image over its masked patches / 2B; KoLeo on each global crop's CLS separately;
    the configured weights."""
    weights = {"dino": 0.7, "ibot": 1.3, "koleo": 0.2}
    cfg = tiny_cfg(*PLAIN, "model.patch_size=7", "masking.mask_probability=1.0",
                   "loss.warmup_teacher_temp=0.05", "loss.warmup_teacher_temp_epochs=0",
                   "loss.teacher_temp=0.06", "loss.student_temp=0.2",
                   *(f"loss.{k}_weight={v}" for k, v in weights.items()),
                   f"heads.ibot_separate_head={str(separate_ibot_head).lower()}",
                   "heads.ibot_n_prototypes=48", "heads.ibot_hidden_dim=64",
                   "heads.ibot_bottleneck_dim=16")
    trainer, batches = make_trainer(cfg, tmp_path / "run")
    task = trainer.task
    batch = batches[0]
    gen = torch.Generator().manual_seed(7)
    for center in (task.dino_center, task.ibot_center):
        center.center.copy_(torch.randn(center.center.shape, generator=gen))
    c_dino, c_ibot = task.dino_center.center.clone(), task.ibot_center.center.clone()
    student, teacher = copy.deepcopy(task.student), copy.deepcopy(task.teacher)

    applied, logs = trainer.train_step([batch], 0)
    assert applied

    t_temp, s_temp = 0.06, 0.2
    g, loc, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    n_img, b = g.shape[0], int(batch["batch_size"])
    idx = masks.flatten().nonzero().flatten()
    t_ibot_head = teacher["ibot_head"] if separate_ibot_head else teacher["dino_head"]
    s_ibot_head = student["ibot_head"] if separate_ibot_head else student["dino_head"]
    with torch.no_grad():
        t_out = teacher["backbone"](g)
        t_cls = teacher["dino_head"](t_out["x_norm_clstoken"])
        t_patch = t_ibot_head(t_out["x_norm_patchtokens"].flatten(0, 1)[idx])
        s_glob, s_loc = student["backbone"]([g, loc], masks=[masks, None])
        s_cls = student["dino_head"](torch.cat([s_glob["x_norm_clstoken"],
                                                s_loc["x_norm_clstoken"]]))
        s_patch = s_ibot_head(s_glob["x_norm_patchtokens"].flatten(0, 1)[idx])
    p_cls = torch.softmax((t_cls - c_dino) / t_temp, -1)
    p_patch = torch.softmax((t_patch - c_ibot) / t_temp, -1)

    n_crops = s_cls.shape[0] // b
    assert n_crops == 2 + cfg.crops.n_local
    pairs = [soft_ce(s_cls[s * b:(s + 1) * b], p_cls[t * b:(t + 1) * b], s_temp).mean()
             for t in range(2) for s in range(n_crops) if s != t]
    dino = float(torch.stack(pairs).mean())

    per_token = soft_ce(s_patch, p_patch, s_temp)
    image = idx // masks.shape[1]
    ibot = float(sum(per_token[image == i].mean() for i in range(n_img) if masks[i].any())
                 / n_img)

    koleo = float(sum(ssl_task.koleo_loss(s_glob["x_norm_clstoken"][c * b:(c + 1) * b])
                      for c in range(2)))

    assert logs["dino_loss"] == pytest.approx(dino, rel=1e-5)
    assert logs["ibot_loss"] == pytest.approx(ibot, rel=1e-5)
    assert logs["koleo_loss"] == pytest.approx(koleo, rel=1e-5)
    total = weights["dino"] * dino + weights["ibot"] * ibot + weights["koleo"] * koleo
    assert logs["loss"] == pytest.approx(total, rel=1e-5)
    torch.testing.assert_close(task.dino_center.center,
                               0.9 * c_dino + 0.1 * t_cls.mean(0, keepdim=True))
    torch.testing.assert_close(task.ibot_center.center,
                               0.9 * c_ibot + 0.1 * t_patch.mean(0, keepdim=True))


def test_teacher_is_the_ema_of_the_updated_student(tiny_cfg, tmp_path: Path) -> None:
    """After a step: teacher = m * teacher_before + (1 - m) * student_after, with m the
    scheduled momentum of that step (cosine from momentum_teacher)."""
    cfg = tiny_cfg(*PLAIN, "optim.warmup_epochs=0", "optim.momentum_teacher=0.9",
                   "optim.final_momentum_teacher=1.0")
    trainer, batches = make_trainer(cfg, tmp_path / "run")
    task = trainer.task
    with torch.no_grad():  # a teacher that differs from the student, so both terms matter
        for p in task.teacher.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    for step in (0, 10):  # schedules are functions of the step: momentum 0.9, then 0.95
        teacher_before = snapshot(task.teacher)
        student_before = snapshot(task.student)
        applied, logs = trainer.train_step([batches[step % 4]], step)
        assert applied
        m = logs["momentum"]
        assert m == pytest.approx(1.0 - 0.05 * (1 + math.cos(math.pi * step / 20)))
        student = snapshot(task.student)
        assert any(not torch.equal(student[k], student_before[k]) for k in student)
        for name, value in snapshot(task.teacher).items():
            expected = m * teacher_before[name] + (1 - m) * student[name]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7, msg=name)


def test_a_skipped_step_leaves_models_optimizer_and_centres_as_they_were(
        tiny_cfg, tmp_path: Path) -> None:
    """A NaN loss (injected) and an inf gradient with a finite loss both skip the step: nothing
    the step touched (weights, teacher, AdamW state, the centres updated by the forward) moves."""
    cfg = tiny_cfg(*PLAIN, "optim.warmup_epochs=0", "debug_nonfinite_steps=[0]")
    trainer, batches = make_trainer(cfg, tmp_path / "run")
    task = trainer.task
    with torch.no_grad():  # a teacher apart from the student, so a stray EMA update shows
        for p in task.teacher.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))

    def state() -> dict[str, torch.Tensor]:
        out = {f"s.{k}": v for k, v in snapshot(task.student).items()}
        out.update({f"t.{k}": v for k, v in snapshot(task.teacher).items()})
        out.update({k: v.clone() for k, v in task.extra_state().items()})
        return out

    def assert_unchanged(before: dict[str, torch.Tensor]) -> None:
        after = state()
        assert [k for k in before if not torch.equal(before[k], after[k])] == []
        for p in task.student.parameters():  # no AdamW state, or a fresh one (fused skip)
            adam = trainer.optimizer.state[p]
            assert not adam or (int(adam["step"]) == 0 and not adam["exp_avg"].any()
                                and not adam["exp_avg_sq"].any())

    before = state()
    applied, _ = trainer.train_step([batches[0]], 0)  # NaN loss
    assert not applied
    assert_unchanged(before)

    weight = task.student["backbone"].patch_embed.proj.weight
    hook = weight.register_hook(lambda grad: grad * float("inf"))
    applied, logs = trainer.train_step([batches[1]], 1)  # finite loss, inf gradient
    hook.remove()
    assert not applied and math.isfinite(logs["loss"])
    assert_unchanged(before)

    applied, _ = trainer.train_step([batches[1]], 1)  # and the next good step applies
    assert applied and any(not torch.equal(v, before[k]) for k, v in state().items())
