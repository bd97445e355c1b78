"""What a checkpoint holds besides files: per-rank RNG states and DCP adapters for the state.

``capture_rng_state`` / ``restore_rng_state`` turn this process's RNG states into JSON data and
back; ``reseed_rng`` is the fallback when the world size changed. ``adapt_state`` wraps the
modules (FSDP2 or plain) and optimizers of a checkpoint's state dict as ``Stateful`` objects
that DCP saves sharded and loads in place (see :mod:`dinosys.distributed.sharded_checkpoint`).
"""

from __future__ import annotations

import base64
import random
import re
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

# --------------------------------------------------------------------------- per-rank state


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict:
    """This process's RNG states (torch CPU, current CUDA device, numpy, python) as JSON data."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what :func:`capture_rng_state` returned."""
    torch.set_rng_state(_unb64(state["torch"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """Seed every RNG from ``(seed, step, rank)``: the fallback when the world size changed."""
    words = np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(2)
    value = int(words[0]) << 32 | int(words[1])
    torch.manual_seed(value)
    np.random.seed(int(words[0]))
    random.seed(value)


# --------------------------------------------------------------------------- state adapters


_LEGACY_GROUP_KEY = re.compile(r"^param_groups\.\d+\.")


class OptimizerState:
    """Pairs an optimizer with the module owning its parameters (DCP needs both).

    :meth:`CheckpointManager.save` finds the owner itself when an optimizer is passed bare;
    use this wrapper when the parameters live in a module that is not in the state dict.

    Parameter groups are saved keyed by their first parameter's name
    (``param_groups.<fqn>.lr``), not by their position in the optimizer: ranks may hold
    different modules (distillation students on rank subgroups), and DCP keeps one value per
    key, so position keys (``param_groups.0.lr``) of different ranks would overwrite each
    other. Checkpoints with position keys still load (every rank had the same groups then).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self._saved_prefixes: set[str] | None = None  # set by load: which params had state
        self._groups_by_position = False  # set by load: a checkpoint with position keys

    def state_dict(self) -> dict:
        osd = get_optimizer_state_dict(self.model, self.optimizer)
        if self._saved_prefixes is not None:
            # Parameters that never had a gradient when saved (e.g. a frozen last layer) have no
            # saved state; get_optimizer_state_dict made some up, so leave them out of the load.
            osd["state"] = {fqn: st for fqn, st in osd["state"].items()
                            if f"state.{fqn}." in self._saved_prefixes}
        if not self._groups_by_position:
            osd["param_groups"] = {_group_key(i, g): g for i, g in enumerate(osd["param_groups"])}
        return osd

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if isinstance(groups, dict):  # keyed as state_dict() made them: the optimizer's order
            state_dict = {**state_dict, "param_groups": list(groups.values())}
        partial = StateDictOptions(strict=self._saved_prefixes is None)
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=partial)
        if self._saved_prefixes is not None:
            kept = set(state_dict["state"])
            names = _param_names(self.model)
            for param in list(self.optimizer.state):
                if names.get(id(param)) not in kept:
                    del self.optimizer.state[param]

    def expect(self, saved_keys: list[str]) -> None:
        """Restrict the next load to the parameters that have state in the checkpoint (and
        read its parameter groups the way it keyed them)."""
        prefixes = set()
        for key in saved_keys:
            parts = key.split(".")
            prefixes.update(".".join(parts[:i]) + "." for i in range(2, len(parts)))
        self._saved_prefixes = prefixes
        self._groups_by_position = any(_LEGACY_GROUP_KEY.match(k) for k in saved_keys)


def _group_key(index: int, group: dict) -> str:
    """A parameter group's checkpoint key: its first parameter's name (the same on every rank
    that holds the group, whatever else the rank holds)."""
    params = group.get("params") or []
    return str(params[0]) if params else f"empty_group_{index}"


class _ModuleState:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict:
        return get_model_state_dict(self.module)

    def load_state_dict(self, state_dict: dict) -> None:
        set_model_state_dict(self.module, state_dict)


def _param_names(model: nn.Module) -> dict[int, str]:
    """Parameter id -> the clean FQN DCP uses (compile / checkpoint-wrapper prefixes removed)."""
    names = {}
    for name, param in model.named_parameters():
        for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module."):
            name = name.replace(wrapper, "")
        names[id(param)] = name
    return names


def _owner_of(optimizer: torch.optim.Optimizer, modules: dict[str, nn.Module]) -> nn.Module:
    """The module in ``modules`` holding all of ``optimizer``'s parameters (or a ModuleDict)."""
    owners: dict[int, str] = {}
    for name, module in modules.items():
        for p in module.parameters():
            owners.setdefault(id(p), name)
    names = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in owners:
                raise ValueError("an optimizer parameter belongs to no module in the checkpoint "
                                 "state; wrap it as OptimizerState(model, optimizer)")
            names.add(owners[id(p)])
    if len(names) == 1:
        return modules[names.pop()]
    return nn.ModuleDict({name: modules[name] for name in sorted(names)})


def adapt_state(state: dict[str, Any]) -> dict[str, Any]:
    """Wrap modules and optimizers as Stateful objects DCP can save and load in place."""
    modules = {k: v for k, v in state.items() if isinstance(v, nn.Module)}
    adapted: dict[str, Any] = {}
    for key, value in state.items():
        if "." in key:
            raise ValueError(f"checkpoint state key {key!r} must not contain a dot")
        if isinstance(value, nn.Module):
            adapted[key] = _ModuleState(value)
        elif isinstance(value, torch.optim.Optimizer):
            adapted[key] = OptimizerState(_owner_of(value, modules), value)
        elif isinstance(value, (Stateful, dict)):
            adapted[key] = value
        else:
            raise TypeError(f"checkpoint state {key!r}: cannot save a {type(value).__name__}")
    return adapted
