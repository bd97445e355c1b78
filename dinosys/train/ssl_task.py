"""The DINOv2 self-supervised task: student and EMA teacher, DINO + iBOT + KoLeo losses.

The teacher sees the 2 global crops (unmasked); the student sees every crop, with iBOT masks
on its global crops. Teacher targets are centred (EMA centre) or Sinkhorn-Knopp normalised.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinosys.config import TrainConfig
from dinosys.losses.dino import dino_loss
from dinosys.losses.ibot import ibot_loss
from dinosys.losses.koleo import koleo_loss
from dinosys.losses.normalize import Centering, sinkhorn_knopp
from dinosys.models import backbone_forward_flops, backbone_from_config
from dinosys.models.flops import group_train_flops
from dinosys.models.heads import build_heads
from dinosys.train.schedules import ScheduleValues
from dinosys.train.task import TrainTask

N_GLOBAL = 2


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


class SSLTask(TrainTask):
    """DINOv2 pretraining (see docs/training.md "Objectives")."""

    name = "ssl"

    def __init__(self, cfg: TrainConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
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
        self.depth = len(backbone.blocks)
        self.distributed = (dist.is_available() and dist.is_initialized()
                            and dist.get_world_size() > 1)
        self.patch_size = backbone.patch_size
        self._head_flops = {k: linear_flops(m) for k, m in parts.items() if k != "backbone"}
        self._flops_cache: dict[tuple, float] = {}

    # -------------------------------------------------------------- TrainTask interface

    def trainable_modules(self) -> Mapping[str, nn.Module]:
        return dict(self.student.items())

    def backbone_depth(self) -> int:
        return self.depth

    def ema_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher, self.student)]

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

    def export_backbone(self) -> nn.Module:
        return self.teacher["backbone"]

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

    def forward_loss(self, batch: Mapping[str, Any], sched: ScheduleValues) -> dict[str, Any]:
        dev = self.device
        global_crops = batch["global_crops"].to(dev, non_blocking=True)
        local_crops = batch["local_crops"].to(dev, non_blocking=True)
        masks = batch["masks"].to(dev, non_blocking=True)
        mask_indices = batch["mask_indices"].to(dev, non_blocking=True)
        mask_weights = batch["mask_weights"].to(dev, non_blocking=True)
        n_images = global_crops.shape[0]  # 2B
        loss_cfg = self.cfg.loss

        dino_probs, ibot_probs, stats = self._teacher_targets(global_crops, mask_indices,
                                                              sched.teacher_temp)
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


def check_finite_config(cfg: TrainConfig) -> None:
    """Reject loss weights that cannot train (all zero)."""
    w = cfg.loss
    if not any(math.isfinite(x) and x > 0 for x in (w.dino_weight, w.ibot_weight, w.koleo_weight)):
        from dinosys.errors import ConfigError

        raise ConfigError("config keys 'loss.*_weight': at least one loss weight must be > 0")
