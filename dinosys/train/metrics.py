"""Per-step training metrics: throughput, MFU, data-wait fraction, memory; JSONL (+ TensorBoard)."""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# dense bf16 peak TFLOP/s per device by name fragment (no sparsity)
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0,
                     "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """Peak TFLOP/s of one device: the configured value, a known GPU's, or None (unknown/CPU)."""
    if configured is not None:
        return float(configured)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self._tb_factory = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb_factory = SummaryWriter
            except ImportError:
                log.warning("log.tensorboard is on but tensorboard is not installed; skipping it")
        self._tb_dir = Path(run_dir) / "tensorboard"

    def _tensorboard(self, first_step: int):  # noqa: ANN202 (SummaryWriter is optional)
        """The TensorBoard writer, created at the first logged step: ``purge_step`` drops the
        events a killed run logged after its last checkpoint, which this run logs again."""
        if self.tb is None and self._tb_factory is not None:
            self.tb = self._tb_factory(str(self._tb_dir), purge_step=first_step)
        return self.tb

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (flat dict with a ``step``) as one JSON line, and to TensorBoard."""
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tensorboard(int(record["step"])) is not None:
            for key, value in record.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key != "step" and numeric:
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tb is not None:
            self.tb.close()


def truncate_after(path: Path, step: int) -> None:
    """Drop records with ``step > step`` (a resumed run re-logs the steps after its checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    from dinosys.atomic import write_atomic

    write_atomic(path, "".join(f"{line}\n" for line in kept))
