"""FSDP2 wrapping of the training models: activation checkpointing, compile, then sharding.

Student and teacher are sharded the same way (each block, then each head, then the backbone
root), so their local shards line up one to one and the teacher EMA is a local foreach update.
With ``dist.fsdp: false`` and several ranks the same code path replicates instead (a (world, 1)
HSDP mesh: plain data parallelism). Single process: the modules stay as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from dinosys.config import DistConfig
from dinosys.distributed.env import DistEnv

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_mesh(env: DistEnv, cfg: DistConfig):  # -> DeviceMesh | None
    """A 1-D sharding mesh over all ranks, or a (world, 1) replicate mesh when fsdp is off."""
    if not env.is_distributed:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if cfg.fsdp:
        return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(env.device.type, (env.world_size, 1),
                            mesh_dim_names=("replicate", "shard"))


def mixed_precision_policy(cfg: DistConfig):
    """FSDP2 MixedPrecisionPolicy from ``dist.param_dtype`` / ``dist.reduce_dtype``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype],
                                reduce_dtype=DTYPES[cfg.reduce_dtype])


def apply_ac_and_compile(backbone: nn.Module, cfg: DistConfig) -> None:
    """Activation checkpointing then per-block compile, in place, as the config asks."""
    if not (cfg.activation_checkpointing or cfg.compile):
        return
    from dinosys.models import vit

    if cfg.activation_checkpointing:
        vit.apply_activation_checkpointing(backbone)
    if cfg.compile:
        vit.compile_blocks(backbone)


def shard_model(parts: Mapping[str, nn.Module], mesh, cfg: DistConfig,
                backbone_key: str = "backbone") -> None:
    """``fully_shard`` each backbone block, each distinct head, then the backbone root."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision_policy(cfg)
    done: set[int] = set()
    backbone = parts[backbone_key]
    for block in backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    for key, module in parts.items():
        if key == backbone_key or id(module) in done:
            continue
        done.add(id(module))
        fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(backbone, mesh=mesh, mp_policy=mp)


def prepare_for_training(student: Mapping[str, nn.Module], teacher: Mapping[str, nn.Module],
                         env: DistEnv, cfg: DistConfig) -> None:
    """Move to the device; token packing on both backbones, AC + compile on the student
    backbone (compile on the teacher's too); FSDP2 both models identically.

    Call after the teacher was initialised as a copy of the student and before building the
    optimizer (FSDP2 replaces parameters by DTensors in place of the originals).
    """
    for module in {id(m): m for m in (*student.values(), *teacher.values())}.values():
        module.to(env.device)
    if cfg.pack_tokens:
        from dinosys.models import vit

        vit.enable_token_packing(student["backbone"])
        vit.enable_token_packing(teacher["backbone"])
    apply_ac_and_compile(student["backbone"], cfg)
    if cfg.compile:
        from dinosys.models import vit

        vit.compile_blocks(teacher["backbone"])
    mesh = build_mesh(env, cfg)
    if mesh is None:
        return
    shard_model(student, mesh, cfg)
    shard_model(teacher, mesh, cfg)
    log.info("FSDP2 (%s) over %d ranks, params %s, reduce %s",
             "sharded" if cfg.fsdp else "replicated", env.world_size, cfg.param_dtype,
             cfg.reduce_dtype)


def is_fsdp(module: nn.Module) -> bool:
    """True for a module wrapped by ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def set_gradient_sync(modules: Iterable[nn.Module], enabled: bool) -> None:
    """Turn gradient reduce-scatter on/off (off on the non-final micro-steps of accumulation)."""
    for module in modules:
        if is_fsdp(module):
            module.set_requires_gradient_sync(enabled)


def autocast_context(env: DistEnv, cfg: DistConfig):
    """Single-process mixed precision: autocast to ``param_dtype`` (FSDP2 casts by itself)."""
    import contextlib

    dtype = DTYPES[cfg.param_dtype]
    if env.is_distributed or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=dtype)
