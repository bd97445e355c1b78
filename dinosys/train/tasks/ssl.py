"""The DINOv2 self-supervised task: student and EMA teacher, DINO + iBOT + KoLeo losses.

The teacher sees the 2 global crops (unmasked); the student sees every crop, with iBOT masks
on its global crops. Teacher targets are centred (EMA centre) or Sinkhorn-Knopp normalised.
The task owns its schedules (teacher temperature, EMA momentum, the heads' frozen last layer)
and its exports (the EMA teacher backbone). Objectives: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dinosys.config import ConfigError, Section, check_bounds, check_choice
from dinosys.data.augment import CropConfig
from dinosys.data.masking import MaskConfig
from dinosys.distributed.env import DistEnv
from dinosys.distributed.fsdp import build_mesh, reshard, shard_modules
from dinosys.losses.dino import dino_loss
from dinosys.losses.ibot import ibot_loss
from dinosys.losses.koleo import koleo_loss
from dinosys.losses.normalize import Centering, sinkhorn_knopp
from dinosys.models import backbone_forward_flops, backbone_from_config
from dinosys.models.flops import group_train_flops
from dinosys.models.heads import HeadConfig, build_heads
from dinosys.models.vit import BackboneConfig
from dinosys.train.ema import ema_pairs, ema_update
from dinosys.train.optim import OptimConfig
from dinosys.train.schedules import cosine, epochs_to_steps, linear_then_constant
from dinosys.train.tasks import register_task
from dinosys.train.tasks.base import Exportable, RunConfig, TrainTask

N_GLOBAL = 2


@dataclass
class SSLLossConfig(Section):
    """Loss weights, temperatures and teacher normalisation of the DINOv2 objective."""

    dino_weight: float = 1.0  # weight of the DINO (image-level) loss
    ibot_weight: float = 1.0  # weight of the iBOT (masked patch) loss
    koleo_weight: float = 0.1  # weight of the KoLeo regulariser (0: off)
    student_temp: float = 0.1  # softmax temperature of the student
    teacher_temp: float = 0.07  # softmax temperature of the teacher after warm-up
    warmup_teacher_temp: float = 0.04  # teacher temperature at the start of its warm-up
    warmup_teacher_temp_epochs: float = 30  # epochs of the linear teacher-temperature warm-up
    centering: str = "centering"  # centering or sinkhorn_knopp
    center_momentum: float = 0.9  # EMA momentum of the teacher centre (centering only)
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp iterations (sinkhorn_knopp only)

    def validate(self) -> None:
        check_choice(self.centering, ("centering", "sinkhorn_knopp"), "loss.centering")
        check_bounds(self, "loss", {
            "dino_weight": (0, None), "ibot_weight": (0, None), "koleo_weight": (0, None),
            "student_temp": (1e-8, None), "teacher_temp": (1e-8, None),
            "warmup_teacher_temp": (1e-8, None), "warmup_teacher_temp_epochs": (0, None),
            "center_momentum": (0, 1), "sinkhorn_iterations": (1, None)})
        weights = (self.dino_weight, self.ibot_weight, self.koleo_weight)
        if not any(math.isfinite(w) and w > 0 for w in weights):
            raise ConfigError("config keys 'loss.*_weight': at least one loss weight must be > 0")


@dataclass
class SSLOptimConfig(OptimConfig):
    """The optimiser plus DINOv2's teacher EMA momentum and the heads' last-layer freeze."""

    # EMA momentum of the teacher at the start (cosine to the final value)
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0  # EMA momentum of the teacher at the end
    freeze_last_layer_epochs: float = 1  # epochs during which the heads' last layer is not updated

    def validate(self) -> None:
        super().validate()
        check_bounds(self, "optim", {"momentum_teacher": (0, 1), "final_momentum_teacher": (0, 1),
                                     "freeze_last_layer_epochs": (0, None)})


@dataclass
class SSLConfig(RunConfig):
    """`dinosys train`: DINOv2 self-supervised pretraining (DINO + iBOT + KoLeo)."""

    name: str = "dinov2"
    task: str = "ssl"
    model: BackboneConfig = field(default_factory=BackboneConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    loss: SSLLossConfig = field(default_factory=SSLLossConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    masking: MaskConfig = field(default_factory=MaskConfig)
    optim: SSLOptimConfig = field(default_factory=SSLOptimConfig)


class SSLSchedules:
    """The task's own per-step values: teacher temperature (linear warmup, then constant), EMA
    momentum (cosine over the run) and whether the heads' last layer is still frozen."""

    def __init__(self, optim: SSLOptimConfig, loss: SSLLossConfig, total_steps: int) -> None:
        self.optim, self.loss, self.total_steps = optim, loss, int(total_steps)
        self.teacher_temp_warmup_steps = epochs_to_steps(loss.warmup_teacher_temp_epochs, optim)
        self.freeze_last_layer_steps = epochs_to_steps(optim.freeze_last_layer_epochs, optim)

    def momentum(self, step: int) -> float:
        """Teacher EMA momentum, cosine ``momentum_teacher -> final_momentum_teacher``."""
        return cosine(step, self.total_steps, self.optim.momentum_teacher,
                      self.optim.final_momentum_teacher)

    def teacher_temp(self, step: int) -> float:
        """Teacher temperature: linear warmup, then constant."""
        return linear_then_constant(step, self.teacher_temp_warmup_steps,
                                    self.loss.warmup_teacher_temp, self.loss.teacher_temp)

    def last_layer_frozen(self, step: int) -> bool:
        """True during the first ``optim.freeze_last_layer_epochs``."""
        return step < self.freeze_last_layer_steps


def linear_flops(module: nn.Module) -> float:
    """Forward FLOPs per input row of a stack of linear layers (2 per multiply-add)."""
    return 2.0 * sum(p.numel() for name, p in module.named_parameters()
                     if p.ndim == 2 and name.endswith("weight"))


@torch.no_grad()
def collapse_stats(probs: Tensor) -> dict[str, Tensor]:
    """Teacher output entropy (mean per sample) and KL(mean prediction || uniform), in nats.

    Collapse to one prototype drives both entropy and the batch mean's entropy to 0 (KL to
    uniform -> log K); collapse to uniform outputs drives entropy to log K and KL to 0.
    Returned as 0-d device tensors: reading them is left to the logger (no host sync here).
    """
    p = probs.float()
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    mean = p.mean(0)
    kl_uniform = (mean * (mean.clamp_min(1e-12) * p.shape[-1]).log()).sum()
    return {"teacher_entropy": entropy, "teacher_kl_uniform": kl_uniform}


@register_task
class SSLTask(TrainTask):
    """DINOv2 pretraining (docs/training.md "Objectives")."""

    name = "ssl"
    config_class = SSLConfig
    command = "train"
    config_kind = "train"
    checkpoint_backbone = "teacher.backbone"

    def __init__(self, cfg: SSLConfig, env: DistEnv | None = None) -> None:
        super().__init__(cfg, env or DistEnv())
        backbone = backbone_from_config(cfg.model)
        dino_head, ibot_head = build_heads(cfg.heads, backbone.embed_dim)
        self.shared_head = ibot_head is dino_head
        parts: dict[str, nn.Module] = {"backbone": backbone, "dino_head": dino_head}
        if not self.shared_head:
            parts["ibot_head"] = ibot_head
        self.student = nn.ModuleDict(parts)
        # the teacher has no stochastic depth; it starts as an exact copy of the student
        teacher_backbone = backbone_from_config(dataclasses.replace(cfg.model,
                                                                    drop_path_rate=0.0))
        teacher_backbone.load_state_dict(backbone.state_dict())
        t_dino, t_ibot = build_heads(cfg.heads, backbone.embed_dim)
        t_parts: dict[str, nn.Module] = {"backbone": teacher_backbone, "dino_head": t_dino}
        if not self.shared_head:
            t_parts["ibot_head"] = t_ibot
        self.teacher = nn.ModuleDict(t_parts)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.student.train()
        k_ibot = cfg.heads.n_prototypes if self.shared_head else cfg.heads.ibot_n_prototypes
        self.dino_center = Centering(cfg.heads.n_prototypes, cfg.loss.center_momentum)
        self.ibot_center = Centering(k_ibot, cfg.loss.center_momentum)
        self.dino_center.to(self.device)
        self.ibot_center.to(self.device)
        self.distributed = self.env.is_distributed
        self.patch_size = backbone.patch_size
        self.schedules = SSLSchedules(cfg.optim, cfg.loss, cfg.total_steps())
        self._ema: tuple[list[Tensor], list[Tensor]] | None = None
        self._head_flops = {k: linear_flops(m) for k, m in parts.items() if k != "backbone"}
        self._flops_cache: dict[tuple, float] = {}

    @classmethod
    def device_layout(cls, cfg: SSLConfig, env: DistEnv) -> SSLConfig:
        """One device: no FSDP2 / activation checkpointing when the step's memory estimate fits
        (dinosys.distributed.layout)."""
        from dinosys.distributed.layout import apply_single_device_layout

        return apply_single_device_layout(cfg, env)[0]

    # -------------------------------------------------------------- modules and data

    def trainable_modules(self) -> Mapping[str, nn.Module]:
        return dict(self.student.items())

    def shard(self) -> None:
        """Student and teacher sharded identically (their EMA pairs are local shards)."""
        mesh = build_mesh(self.env, self.cfg.dist)
        shard_modules(self.student, self.env, self.cfg.dist, mesh, trainable=True)
        shard_modules(self.teacher, self.env, self.cfg.dist, mesh, trainable=False)

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher}

    def extra_state(self) -> dict[str, Tensor]:
        if self.cfg.loss.centering != "centering":
            return {}
        return {"dino_center": self.dino_center.center, "ibot_center": self.ibot_center.center}

    def load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            if "dino_center" in state:
                self.dino_center.center.copy_(state["dino_center"])
            if "ibot_center" in state:
                self.ibot_center.center.copy_(state["ibot_center"])

    def build_loader(self) -> Iterable[Any]:
        """Multi-crop + iBOT masks over the run's sources (resumable, rank-split)."""
        from dinosys.data.multicrop import build_ssl_loader

        return build_ssl_loader(self.cfg, self.env.rank, self.env.world_size, self.patch_size)

    def prepare_batch(self, batch: Any) -> Any:
        """Device-side photometric ops (``data.gpu_augment``), then tensors to the device."""
        from dinosys.data.gpu_augment import apply_photometric

        return super().prepare_batch(apply_photometric(batch, self.device))

    def exports(self) -> dict[str, Exportable]:
        """The EMA teacher backbone."""
        cfg = self.cfg
        card = {"mean": list(cfg.crops.mean), "std": list(cfg.crops.std),
                "objective": "DINOv2 (DINO + iBOT + KoLeo), EMA teacher backbone"}
        build = lambda: backbone_from_config(  # noqa: E731
            dataclasses.replace(cfg.model, drop_path_rate=0.0))
        return {"teacher": Exportable(self.teacher["backbone"], build, card)}

    # -------------------------------------------------------------- schedules and hooks

    def schedule_values(self, step: int) -> dict[str, float]:
        return {"momentum": self.schedules.momentum(step),
                "teacher_temp": self.schedules.teacher_temp(step)}

    def before_optimizer_step(self, step: int) -> None:
        """The heads' last layer stays frozen early on: its gradients are dropped (AdamW then
        skips it: no update, no state), before clipping."""
        if self.schedules.last_layer_frozen(step):
            for module in self.student.values():
                for name, param in module.named_parameters():
                    if "last_layer" in name:
                        param.grad = None

    def after_optimizer_step(self, step: int, applied: Tensor) -> None:
        """Teacher EMA update on the local shards (none when the step was skipped)."""
        reshard(self.teacher)  # FSDP2 left the teacher's root unsharded after its forward
        if self._ema is None:
            self._ema = ema_pairs(self.teacher, self.student)
        ema_update(*self._ema, self.schedules.momentum(step), apply=applied)

    # -------------------------------------------------------------- the objective

    def _heads(self, model: nn.ModuleDict, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """DINO logits of ``cls`` and iBOT logits of ``patches``; one call when the head is
        shared (FSDP2 runs each module's forward once per step)."""
        if self.shared_head:
            out = model["dino_head"](torch.cat([cls, patches]))
            return out[: len(cls)], out[len(cls):]
        return model["dino_head"](cls), model["ibot_head"](patches)

    @torch.no_grad()
    def _teacher_targets(self, global_crops: Tensor, mask_indices: Tensor, temp: float
                         ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        out = self.teacher["backbone"](global_crops)
        cls = out["x_norm_clstoken"]
        patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
        cls_logits, patch_logits = self._heads(self.teacher, cls, patches)
        loss_cfg = self.cfg.loss
        if loss_cfg.centering == "centering":
            dino_probs = self.dino_center.softmax_centered(cls_logits, temp)
            ibot_probs = self.ibot_center.softmax_centered(patch_logits, temp)
            self.dino_center.update(cls_logits)
            self.ibot_center.update(patch_logits)
        else:
            dino_probs = sinkhorn_knopp(cls_logits, temp, loss_cfg.sinkhorn_iterations)
            ibot_probs = sinkhorn_knopp(patch_logits, temp, loss_cfg.sinkhorn_iterations)
        return dino_probs, ibot_probs, collapse_stats(dino_probs)

    def forward_loss(self, batch: Mapping[str, Any], step: int) -> dict[str, Any]:
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        masks, mask_indices = batch["masks"], batch["mask_indices"]
        mask_weights = batch["mask_weights"]
        n_images = global_crops.shape[0]  # 2B
        loss_cfg = self.cfg.loss

        dino_probs, ibot_probs, stats = self._teacher_targets(
            global_crops, mask_indices, self.schedules.teacher_temp(step))
        has_local = local_crops.numel() > 0
        crops = [global_crops, local_crops] if has_local else [global_crops]
        crop_masks = [masks, None] if has_local else [masks]
        outs = self.student["backbone"](crops, masks=crop_masks)
        g_cls = outs[0]["x_norm_clstoken"]
        cls = torch.cat([g_cls, outs[1]["x_norm_clstoken"]]) if has_local else g_cls
        patches = outs[0]["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
        cls_logits, patch_logits = self._heads(self.student, cls, patches)

        dino = dino_loss(cls_logits[:n_images], dino_probs,
                         cls_logits[n_images:] if has_local else None,
                         n_global_crops=N_GLOBAL, student_temp=loss_cfg.student_temp)
        ibot = ibot_loss(patch_logits, ibot_probs, mask_weights, n_images,
                         student_temp=loss_cfg.student_temp)
        koleo = sum(koleo_loss(chunk, distributed=self.distributed)
                    for chunk in g_cls.float().chunk(N_GLOBAL))
        loss = (loss_cfg.dino_weight * dino.loss + loss_cfg.ibot_weight * ibot
                + loss_cfg.koleo_weight * koleo)
        return {"loss": loss, "dino_loss": dino.loss.detach(),
                "dino_global_loss": dino.global_loss, "dino_local_loss": dino.local_loss,
                "ibot_loss": ibot.detach(), "koleo_loss": koleo.detach(),
                "n_masked": float(len(mask_indices)), **stats}

    # -------------------------------------------------------------- accounting

    def _student_backbone_flops(self, size: int, n: int) -> float:
        key = ("student", size, n)
        if key not in self._flops_cache:
            self._flops_cache[key] = group_train_flops(self.cfg.model, size, n)
        return self._flops_cache[key]

    def _teacher_backbone_flops(self, size: int) -> float:
        key = ("teacher", size)
        if key not in self._flops_cache:
            self._flops_cache[key] = backbone_forward_flops(self.cfg.model, size)
        return self._flops_cache[key]

    def step_flops(self, batch: Mapping[str, Any]) -> float:
        """Model FLOPs of one step on this rank's batch: the student's forward + backward over
        every crop (each crop-size group as the backbone runs it, with efficient stochastic
        depth counting only the samples its branches compute), the student heads' forward +
        backward, and the teacher's forward (backbone on the global crops, heads). Activation
        checkpointing recompute is not counted."""
        g = batch["global_crops"]
        loc = batch["local_crops"]
        n_g, n_l = g.shape[0], (loc.shape[0] if loc.numel() else 0)
        m = int(batch["n_masked"])
        bb_student = self._student_backbone_flops(g.shape[-1], n_g)
        if n_l:
            bb_student += self._student_backbone_flops(loc.shape[-1], n_l)
        bb_teacher = self._teacher_backbone_flops(g.shape[-1]) * n_g
        dino_h = self._head_flops["dino_head"]
        ibot_h = self._head_flops.get("ibot_head", dino_h)
        heads_student = dino_h * (n_g + n_l) + ibot_h * m
        heads_teacher = dino_h * n_g + ibot_h * m
        return bb_student + 3.0 * heads_student + bb_teacher + heads_teacher
