"""Per-step training metrics: throughput, MFU, data-wait fraction, memory; JSONL (+ TensorBoard)."""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dinosys.config import Section, check_bounds

log = logging.getLogger(__name__)


@dataclass
class LogConfig(Section):
    """Per-step metrics."""

    every_n_steps: int = 10  # a metrics.jsonl record (and a progress line in a log) every N steps
    tensorboard: bool = False  # also write TensorBoard events to RUN/tensorboard
    peak_tflops: float | None = None  # per device; None: by exact GPU name + dtype (metrics)
    progress: bool = True  # progress bar on a terminal, plain progress lines in a log

    def validate(self) -> None:
        check_bounds(self, "log", {"every_n_steps": (1, None), "peak_tflops": (1e-6, None)})

# Dense (no sparsity) datasheet peaks in TFLOP/s by the exact name torch.cuda.get_device_name
# reports, per compute dtype: bf16/fp16 tensor cores, tf32 (fp32 matmuls with TF32 allowed),
# and plain fp32. A PCIe or NVL part is not its SXM sibling: each name is listed on its own.
_H100_SXM = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
_H100_PCIE = {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}
_H_NVL = {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}
_A100 = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H100 NVL": _H_NVL,
    "NVIDIA H800": _H100_SXM,
    "NVIDIA H200": _H100_SXM,
    "NVIDIA H200 NVL": _H_NVL,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
}


def matmul_dtype(dtype: str) -> str:
    """The tensor-core dtype an ``fp32``/``bf16``/``fp16`` run's matmuls use: fp32 matmuls
    run as tf32 unless torch's float32 matmul precision is "highest"."""
    if dtype == "fp32":
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return dtype


def known_peak_tflops(device_name: str, dtype: str) -> float | None:
    """The datasheet peak of ``device_name`` (exact name) for ``dtype``, or None if unknown."""
    return PEAK_TFLOPS.get(device_name.strip(), {}).get(matmul_dtype(dtype))


def peak_tflops(device: torch.device, configured: float | None,
                dtype: str = "bf16") -> float | None:
    """Peak TFLOP/s of one device for ``dtype``: the configured value, else the table's entry
    for this exact device name, else None (CPU, or a GPU the table does not know: logged)."""
    if configured is not None:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = known_peak_tflops(name, dtype)
    if peak is None:
        log.warning("no known %s peak for device %r: MFU is not reported (set the peak by "
                    "hand: log.peak_tflops / --peak-tflops)", matmul_dtype(dtype), name)
    return peak


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
