"""One distillation student: its modules, EMA, teacher-target normaliser and objective.

Head mode (the DINOv2 recipe): the teacher's DINO/iBOT bottlenecks go through the teacher's own
prototype layers and are centred (EMA centre) or Sinkhorn-Knopp normalised over the student's
whole global batch; the student trains DINO (every student crop vs the teacher's two global
crops), iBOT on the two global crops (every patch without student masking; the masked ones
with ``loss.mask_student``) and KoLeo on its global-crop cls, with no stochastic depth.
Feature mode: the student's global-crop cls and patch tokens match the teacher's
(:class:`dinosys.losses.distill.FeatureDistillLoss`), plus KoLeo when weighted.

Everything here runs on the student's ranks with ``group`` (None: the default group, or none
single-process); losses are per-rank means whose rank average is the global-batch loss.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dinosys.distill.config import DistillLossConfig, StudentConfig
from dinosys.distill.teacher import Teacher
from dinosys.losses._dist import is_distributed
from dinosys.losses.dino import dino_loss
from dinosys.losses.distill import FeatureDistillLoss
from dinosys.losses.ibot import ibot_loss
from dinosys.losses.koleo import koleo_loss
from dinosys.losses.normalize import Centering, sinkhorn_knopp
from dinosys.losses.soft_ce import soft_cross_entropy
from dinosys.models import backbone_from_config
from dinosys.models.heads import build_heads

N_GLOBAL = 2


class HeadTargets(nn.Module):
    """Teacher bottlenecks -> target probabilities: the teacher's prototype layers (a frozen
    replicated copy) then centering or Sinkhorn-Knopp over ``group``'s global batch."""

    def __init__(self, teacher: Teacher, loss: DistillLossConfig, group: Any = None) -> None:
        super().__init__()
        self.dino_last = copy.deepcopy(teacher.dino_head.last_layer).requires_grad_(False)
        shared = teacher.ibot_head is teacher.dino_head
        self.ibot_last = (self.dino_last if shared
                          else copy.deepcopy(teacher.ibot_head.last_layer).requires_grad_(False))
        self.loss, self.group = loss, group
        self.dino_center = Centering(teacher.dino_head.n_prototypes, loss.center_momentum, group)
        self.ibot_center = Centering(teacher.ibot_head.n_prototypes, loss.center_momentum, group)

    @torch.no_grad()
    def forward(self, cls_bottleneck: Tensor, patch_bottleneck: Tensor, temp: float
                ) -> tuple[Tensor, Tensor]:
        """(2c, d) and (M, d) teacher bottlenecks -> (2c, K) and (M, K) probabilities."""
        dtype = self.dino_last.weight.dtype
        cls_logits = self.dino_last(cls_bottleneck.to(dtype)).float()
        patch_logits = self.ibot_last(patch_bottleneck.to(dtype)).float()
        if self.loss.centering == "centering":
            dino = self.dino_center.softmax_centered(cls_logits, temp)
            ibot = self.ibot_center.softmax_centered(patch_logits, temp)
            self.dino_center.update(cls_logits)
            self.ibot_center.update(patch_logits)
            return dino, ibot
        n_it = self.loss.sinkhorn_iterations
        return (sinkhorn_knopp(cls_logits, temp, n_it, group=self.group),
                sinkhorn_knopp(patch_logits, temp, n_it, group=self.group))

    def state(self) -> dict[str, Tensor]:
        """The centres (checkpointed with the student)."""
        if self.loss.centering != "centering":
            return {}
        return {"dino_center": self.dino_center.center, "ibot_center": self.ibot_center.center}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state`."""
        with torch.no_grad():
            for key, module in (("dino_center", self.dino_center),
                                ("ibot_center", self.ibot_center)):
                if key in state:
                    module.center.copy_(state[key])


def masked_positions(masks: Tensor, mask_student: bool) -> tuple[Tensor, Tensor]:
    """``(indices into the flattened (2c*N) patches, per-token weights 1/#positions in the
    image)`` of the iBOT positions: the masked patches, or every patch without masking."""
    positions = masks if mask_student else torch.ones_like(masks)
    indices = positions.flatten().nonzero().flatten()
    per_image = positions.sum(-1).clamp(min=1).to(torch.float32)
    weights = (1.0 / per_image).unsqueeze(-1).expand_as(positions)[positions]
    return indices, weights


class Student:
    """A student's trainable modules (``modules``), backbone EMA (``ema``) and objective."""

    def __init__(self, cfg: StudentConfig, teacher: Teacher, loss: DistillLossConfig,
                 mode: str, group: Any = None) -> None:
        self.name, self.cfg, self.loss_cfg, self.mode, self.group = cfg.name, cfg, loss, mode, group
        model_cfg = dataclasses.replace(cfg.model, drop_path_rate=0.0)  # no stochastic depth
        backbone = backbone_from_config(model_cfg)
        parts: dict[str, nn.Module] = {"backbone": backbone}
        self.targets: HeadTargets | None = None
        self.feature_loss: FeatureDistillLoss | None = None
        if mode == "heads":
            t_heads = teacher.head_cfg
            heads_cfg = dataclasses.replace(
                cfg.heads, n_prototypes=t_heads.n_prototypes,
                ibot_separate_head=t_heads.ibot_separate_head,
                ibot_n_prototypes=t_heads.ibot_n_prototypes)
            dino, ibot = build_heads(heads_cfg, backbone.embed_dim)
            parts["dino_head"] = dino
            if ibot is not dino:
                parts["ibot_head"] = ibot
            self.shared_head = ibot is dino
            self.targets = HeadTargets(teacher, loss, group)
        if mode == "features" or loss.feature_weight > 0:
            self.feature_loss = FeatureDistillLoss(
                backbone.embed_dim, teacher.embed_dim, loss.cls_weight, loss.patch_weight,
                loss.cosine_weight, loss.smooth_l1_weight, loss.smooth_l1_beta)
            if not isinstance(self.feature_loss.proj, nn.Identity):
                parts["proj"] = self.feature_loss.proj
        self.modules = nn.ModuleDict(parts)
        self.ema = backbone_from_config(model_cfg)
        self.ema.load_state_dict(backbone.state_dict())
        self.ema.requires_grad_(False)
        self.ema.eval()
        self.depth = len(backbone.blocks)
        self.model_cfg = model_cfg

    @property
    def backbone(self) -> nn.Module:
        """The trained backbone."""
        return self.modules["backbone"]

    def to(self, device: torch.device) -> Student:
        """Move every module (and the target normaliser) to ``device``."""
        self.modules.to(device)
        self.ema.to(device)
        if self.targets is not None:
            self.targets.to(device)
        return self

    def extra_state(self) -> dict[str, Tensor]:
        """Non-parameter state to checkpoint (the teacher-target centres)."""
        return self.targets.state() if self.targets is not None else {}

    def load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`extra_state`."""
        if self.targets is not None:
            self.targets.load_state(state)

    def _koleo(self, g_cls: Tensor) -> Tensor:
        distributed = is_distributed(self.group)
        return sum(koleo_loss(chunk, distributed=distributed, group=self.group)
                   for chunk in g_cls.float().chunk(N_GLOBAL))

    def forward_loss(self, crops: Mapping[str, Tensor], teacher_out: Mapping[str, Tensor],
                     teacher_temp: float) -> dict[str, Tensor]:
        """The student's loss on its chunk: ``crops`` (global_crops (2c,C,H,W), local_crops
        (L*c,...) or empty, masks (2c,N)) and ``teacher_out`` of the same global crops,
        crop-major. Returns ``{"loss": ..., other scalar logs}``."""
        if self.mode == "heads":
            return self._head_loss(crops, teacher_out, teacher_temp)
        return self._feature_loss(crops, teacher_out)

    def _head_loss(self, crops: Mapping[str, Tensor], t_out: Mapping[str, Tensor],
                   temp: float) -> dict[str, Tensor]:
        cfg = self.loss_cfg
        g = crops["global_crops"]
        loc = crops["local_crops"]
        masks = crops["masks"]
        n_images = g.shape[0]
        indices, weights = masked_positions(masks, cfg.mask_student)
        dino_probs, ibot_probs = self.targets(t_out["cls_bottleneck"],
                                              t_out["patch_bottleneck"].flatten(0, 1)[indices],
                                              temp)
        has_local = loc.numel() > 0
        student_masks = masks if cfg.mask_student else None
        xs = [g, loc] if has_local else [g]
        outs = self.backbone(xs, masks=[student_masks, None] if has_local else [student_masks])
        g_cls = outs[0]["x_norm_clstoken"]
        cls = torch.cat([g_cls, outs[1]["x_norm_clstoken"]]) if has_local else g_cls
        patches = outs[0]["x_norm_patchtokens"].flatten(0, 1)[indices]
        if self.shared_head:
            both = self.modules["dino_head"](torch.cat([cls, patches]))
            cls_logits, patch_logits = both[: len(cls)], both[len(cls):]
        else:
            cls_logits = self.modules["dino_head"](cls)
            patch_logits = self.modules["ibot_head"](patches)
        dino = dino_loss(cls_logits[:n_images], dino_probs,
                         cls_logits[n_images:] if has_local else None,
                         n_global_crops=N_GLOBAL, student_temp=cfg.student_temp)
        ibot = ibot_loss(patch_logits, ibot_probs, weights.to(patch_logits.device), n_images,
                         student_temp=cfg.student_temp)
        dino_term = dino.loss
        if cfg.dino_same_view:  # + each crop against the teacher's view of itself
            k = dino_probs.shape[-1]
            same = soft_cross_entropy(cls_logits[:n_images].reshape(N_GLOBAL, -1, k),
                                      dino_probs.reshape(N_GLOBAL, -1, k), cfg.student_temp)
            dino_term = 0.5 * (dino.loss + same.mean())
        koleo = self._koleo(g_cls) if cfg.koleo_weight else g_cls.new_zeros(())
        loss = cfg.dino_weight * dino_term + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
        out = {"dino_loss": dino_term.detach(), "ibot_loss": ibot.detach(),
               "koleo_loss": koleo.detach()}
        if self.feature_loss is not None and cfg.feature_weight > 0:
            terms = self.feature_loss(g_cls, outs[0]["x_norm_patchtokens"], t_out["cls"],
                                      t_out["patches"])
            loss = loss + cfg.feature_weight * terms.loss
            out.update(cls_loss=terms.cls, patch_loss=terms.patch)
        return {"loss": loss, **out}

    def _feature_loss(self, crops: Mapping[str, Tensor], t_out: Mapping[str, Tensor]
                      ) -> dict[str, Tensor]:
        cfg = self.loss_cfg
        masks = crops["masks"] if cfg.mask_student else None
        out = self.backbone(crops["global_crops"], masks=masks)
        g_cls = out["x_norm_clstoken"]
        terms = self.feature_loss(g_cls, out["x_norm_patchtokens"], t_out["cls"],
                                  t_out["patches"])
        koleo = self._koleo(g_cls) if cfg.koleo_weight else g_cls.new_zeros(())
        loss = terms.loss + cfg.koleo_weight * koleo
        return {"loss": loss, "cls_loss": terms.cls, "patch_loss": terms.patch,
                "koleo_loss": koleo.detach()}
