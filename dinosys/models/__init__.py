"""Backbones: the DINOv2 vision transformer family (``create_backbone``)."""

from dinosys.models.flops import backbone_forward_flops, backbone_train_flops
from dinosys.models.vit import (
    DinoVisionTransformer,
    apply_activation_checkpointing,
    arch_names,
    backbone_from_config,
    compile_blocks,
    create_backbone,
    enable_token_packing,
    resolve_config,
)

__all__ = [
    "DinoVisionTransformer",
    "apply_activation_checkpointing",
    "arch_names",
    "backbone_forward_flops",
    "backbone_from_config",
    "backbone_train_flops",
    "compile_blocks",
    "create_backbone",
    "enable_token_packing",
    "resolve_config",
]
