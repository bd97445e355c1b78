"""FSDP2 wrapping of any set of training modules: activation checkpointing, compile, sharding.

Modules of the same structure are sharded the same way (each block, then each other module,
then the modules with blocks as roots), so a student and its EMA teacher have local shards that
line up one to one and the EMA is a local foreach update.
With ``dist.fsdp: false`` and several ranks the same code path replicates instead (a (world, 1)
HSDP mesh: plain data parallelism). Single process: the modules stay as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dinosys.config import ConfigError, Section, check_choice
from dinosys.distributed.env import DistEnv

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistConfig(Section):
    """Distribution and performance: FSDP2, mixed precision, activation checkpointing, compile."""

    fsdp: bool = True  # FSDP2 fully_shard when more than one rank
    param_dtype: str = "bf16"  # fp32, bf16, fp16
    reduce_dtype: str = "fp32"  # gradient reduction dtype: fp32, bf16
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    activation_checkpointing: bool = False  # recompute block activations in backward (less memory)
    compile: bool = False  # torch.compile the blocks
    pack_tokens: bool = False  # all crops' tokens as one tensor per block (models.vit)

    def validate(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            check_choice(getattr(self, name), ("fp32", "bf16", "fp16"), f"dist.{name}")
        if self.grad_accum_steps < 1:
            raise ConfigError("config key 'dist.grad_accum_steps': must be >= 1")


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


def _blocks(module: nn.Module) -> nn.ModuleList | None:
    blocks = getattr(module, "blocks", None)
    return blocks if isinstance(blocks, nn.ModuleList) else None


def shard_modules(parts: Mapping[str, nn.Module], env: DistEnv, cfg: DistConfig, mesh,
                  trainable: bool = True) -> None:
    """Prepare a set of modules for training, in place: move to the device; token packing
    (``dist.pack_tokens``), activation checkpointing (``trainable`` only) and per-block compile
    on every module with ``blocks``;
    then, with a mesh, FSDP2 ``fully_shard`` of each block, each other distinct module, then each
    module with blocks as a root.

    Any set works (one student, several students, a frozen teacher): two sets of modules with
    the same structure (a student and its EMA teacher) shard identically, so their local shards
    line up one to one. Call before building the optimizer (FSDP2 replaces parameters by
    DTensors).
    """
    unique = list({id(m): m for m in parts.values()}.values())
    for module in unique:
        module.to(env.device)
    from dinosys.models import vit

    for module in unique:
        if _blocks(module) is None:
            continue
        if cfg.pack_tokens:
            vit.enable_token_packing(module)
        if trainable and cfg.activation_checkpointing:
            vit.apply_activation_checkpointing(module)
        if cfg.compile:
            vit.compile_blocks(module)
    if mesh is None:
        return
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision_policy(cfg)
    with_blocks = [m for m in unique if _blocks(m) is not None]
    for module in with_blocks:
        for block in _blocks(module):
            fully_shard(block, mesh=mesh, mp_policy=mp)
    for module in unique:
        if _blocks(module) is None:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    for module in with_blocks:
        fully_shard(module, mesh=mesh, mp_policy=mp)
    log.info("FSDP2 (%s) of %s over %d ranks, params %s, reduce %s",
             "sharded" if cfg.fsdp else "replicated", ", ".join(parts), env.world_size,
             cfg.param_dtype, cfg.reduce_dtype)


def is_fsdp(module: nn.Module) -> bool:
    """True for a module wrapped by ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard(module: nn.Module) -> None:
    """Put every FSDP2-wrapped submodule of ``module`` back into its sharded state.

    FSDP2 keeps a root module's parameters unsharded after its forward (it expects a backward
    right after). A module that only runs forward, such as an EMA teacher, then holds full
    copies: the EMA must write the shards, and the next forward must all-gather them again.
    No-op without FSDP2.
    """
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


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
