"""The ``clip`` task: CLIP (InfoNCE), SigLIP (sigmoid) and LiT / dino.txt image-text training.

``dinosys clip CONFIG`` (and ``launch/submit.py clip``) runs it through the same loop as every
task. The model (:mod:`dinosys.models.clip`) is a trained ViT tower or a locked backbone with
new blocks (LiT), plus a causal text tower; the batch is one augmented view per image and its
tokenised caption (:mod:`dinosys.data.image_text`). The loss is the symmetric InfoNCE with
features gathered with gradient and a local B_local x B_global loss (``loss.kind: clip``) or the
SigLIP sigmoid loss by neighbour exchange (``siglip``); equal captions in a batch count as
positives (``loss.equal_captions_positive``, on by default: label-derived captions repeat).
After each optimizer step the learned log-scale is clamped to [0, ln 100]. A locked backbone
has no gradients, no optimizer state and is not in checkpoints (it is reloaded from
``model.image.locked``); exports hold everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from dinosys.config import ConfigError, Section, check_choice
from dinosys.data.image_text import ImageTextBatches, ImageTextConfig
from dinosys.data.stream import SampleLoader
from dinosys.losses.clip import LOGIT_SCALE_INIT, clamp_logit_scale_, clip_loss, text_keys
from dinosys.losses.siglip import SIGLIP_BIAS_INIT, SIGLIP_SCALE_INIT, siglip_loss
from dinosys.models.clip import CLIPModel, ClipModelConfig, build_clip_model
from dinosys.train.tasks import register_task
from dinosys.train.tasks.base import Exportable, RunConfig, TrainTask


@dataclass
class ClipLossConfig(Section):
    """The contrastive objective."""

    kind: str = "clip"  # clip (softmax InfoNCE) | siglip (pairwise sigmoid)
    equal_captions_positive: bool = True  # identical captions in a batch are positives

    def validate(self) -> None:
        check_choice(self.kind, ("clip", "siglip"), "loss.kind")


@dataclass
class ClipRunConfig(RunConfig):
    """``task: clip``: an image tower and a text tower trained on image-caption pairs."""

    name: str = "clip"
    task: str = "clip"
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    loss: ClipLossConfig = field(default_factory=ClipLossConfig)
    image: ImageTextConfig = field(default_factory=ImageTextConfig)

    def validate(self) -> None:
        super().validate()
        img_size = self.model.image.backbone.img_size
        if self.model.image.locked is None and self.image.size != img_size:
            raise ConfigError(f"config key 'image.size': {self.image.size} differs from "
                              f"model.image.backbone.img_size={img_size}")
        if self.model.init_logit_bias is not None and self.loss.kind != "siglip":
            raise ConfigError("config key 'model.init_logit_bias': only loss.kind=siglip has a "
                              "bias")


def model_config_for(cfg: ClipRunConfig) -> ClipModelConfig:
    """The model config with the loss kind's logit scale / bias initialisation filled in."""
    model = cfg.model
    if cfg.loss.kind == "siglip":
        scale = SIGLIP_SCALE_INIT if model.init_logit_scale == LOGIT_SCALE_INIT else \
            model.init_logit_scale
        bias = SIGLIP_BIAS_INIT if model.init_logit_bias is None else model.init_logit_bias
        return replace(model, init_logit_scale=scale, init_logit_bias=bias)
    return model


@register_task
class ClipTask(TrainTask):
    """CLIP / SigLIP / LiT training of a :class:`CLIPModel`."""

    name = "clip"
    config_class = ClipRunConfig
    command = "clip"
    config_kind = "clip"

    def __init__(self, cfg: ClipRunConfig, env) -> None:  # noqa: ANN001 - DistEnv
        super().__init__(cfg, env)
        self.model_cfg = model_config_for(cfg)
        self.model: CLIPModel = build_clip_model(self.model_cfg)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"clip": self.model}

    def shard(self) -> None:
        """Device, activation checkpointing and compile of both towers' blocks, then FSDP2 per
        block (image and text) and the model as root. A locked backbone follows ``.to()`` but
        is never sharded (it has no trainable state; every rank holds it)."""
        from dinosys.distributed.fsdp import build_mesh, mixed_precision_policy
        from dinosys.models.vit import apply_activation_checkpointing, compile_blocks

        cfg, model = self.cfg.dist, self.model
        model.to(self.device)
        block_lists = [model.text.transformer.resblocks]
        if not model.is_locked:
            block_lists.append(model.visual.backbone.blocks)
            if cfg.activation_checkpointing:
                apply_activation_checkpointing(model.visual.backbone)
            if cfg.compile:
                compile_blocks(model.visual.backbone)
        elif len(model.visual.blocks):
            block_lists.append(model.visual.blocks)
        model.text.transformer.grad_checkpointing = cfg.activation_checkpointing
        mesh = build_mesh(self.env, cfg)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mp = mixed_precision_policy(cfg)
        for blocks in block_lists:
            for block in blocks:
                fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)

    def build_loader(self) -> SampleLoader:
        transform = ImageTextBatches(self.cfg.image, self.model_cfg.text.context_length)
        return SampleLoader(self.cfg.data, self.cfg.seed, self.env.rank, self.env.world_size,
                            transform)

    def forward_loss(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        model = self.model
        img, txt = model(batch["images"], batch["tokens"])
        keys = text_keys(batch["tokens"]) if self.cfg.loss.equal_captions_positive else None
        if self.cfg.loss.kind == "siglip":
            loss = siglip_loss(img, txt, model.logit_scale, model.logit_bias, keys=keys)
        else:
            loss = clip_loss(img, txt, model.logit_scale, keys=keys)
        out: dict[str, Any] = {"loss": loss,
                               "logit_scale": model.logit_scale.detach().exp().reshape(()),
                               "text_truncated": float(batch.get("text_truncated", 0))}
        if model.logit_bias is not None:
            out["logit_bias"] = model.logit_bias.detach().reshape(())
        return out

    def after_optimizer_step(self, step: int, applied: torch.Tensor) -> None:
        # a skipped step left the scale as it was, already clamped: clamping is a no-op then
        clamp_logit_scale_(self.model.logit_scale)

    def exports(self) -> dict[str, Exportable]:
        card = {"mean": list(self.cfg.image.mean), "std": list(self.cfg.image.std),
                "objective": self.cfg.loss.kind, "image_size": self.cfg.image.size}
        return {"clip": Exportable(self.model, lambda: build_clip_model(self.model_cfg), card)}
