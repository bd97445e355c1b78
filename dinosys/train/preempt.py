"""Preemption: SIGUSR2/SIGTERM set a flag on every rank; ranks agree at a step boundary."""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from dinosys.distributed.env import DistEnv

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    """Installs handlers that only set a flag (safe inside a signal handler); restores on close."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        """Catch the preemption signals (main thread only; a no-op elsewhere)."""
        try:
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            log.warning("preemption signals not caught: not in the main thread")
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def close(self) -> None:
        """Restore the previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def agreed(self, env: DistEnv) -> bool:
        """True on every rank when any rank was signalled (all-reduce max of the flag)."""
        if not env.is_distributed:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
