"""Helpers for the launcher tests: a trivial checkpointing job and submission shortcuts.

``counting_work`` follows the trainer's preemption contract with a counter instead of a model:
every rank installs a USR2 flag handler, the ranks agree at each step boundary (gloo all-reduce),
and on preemption rank 0 saves the step and every rank returns ``{"status": "preempted"}``.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle

from launch.jobs import PreparedJob
from launch.submit import build_parser, submit_slurm

# the jobs unpickle these functions by value: this module is not importable inside a job
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def counting_work(total_steps: int, step_s: float, ctx,  # noqa: ANN001
                  self_signal_at: int | None = None) -> dict:
    """Count to ``total_steps``, one line per step in metrics.jsonl; resumable, preemptible.
    ``self_signal_at``: in its first run, rank 0 sends itself USR2 at that step."""
    import torch
    import torch.distributed as dist

    flag = {"set": False}
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: flag.update(set=True))
    distributed = ctx.world_size > 1
    if distributed:
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    ckpt = ctx.run_dir / "ckpt.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    status, step = "finished", start
    try:
        for step in range(start + 1, total_steps + 1):
            time.sleep(step_s)
            if step == self_signal_at and ctx.rank == 0 and ctx.restart_count == 0:
                os.kill(os.getpid(), signal.SIGUSR2)
            agreed = torch.tensor([1.0 if flag["set"] else 0.0])
            if distributed:
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            if ctx.rank == 0:
                with open(ctx.run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps({"step": step, "restart": ctx.restart_count,
                                         "world_size": ctx.world_size, "job": ctx.job_id}) + "\n")
            if agreed.item() > 0:
                if ctx.rank == 0:
                    tmp = ckpt.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"step": step}))
                    os.replace(tmp, ckpt)
                status = "preempted"
                break
        if distributed:
            dist.barrier()
    finally:
        if distributed:
            dist.destroy_process_group()
        signal.signal(signal.SIGUSR2, previous)
    return {"status": status, "step": step}


def counting_job(total_steps: int, step_s: float, self_signal_at: int | None = None
                 ) -> PreparedJob:
    """A distributed, preemption-handling job around :func:`counting_work`."""
    return PreparedJob(kind="train", name="count", resolved_config="name: count\n",
                       work=functools.partial(counting_work, total_steps, step_s,
                                              self_signal_at=self_signal_at),
                       distributed=True, handles_preemption=True)


def submit(job: PreparedJob, launcher_args: list[str]) -> dict:
    """Submit ``job`` through the launcher with these launcher options."""
    args = build_parser().parse_args([job.kind, *launcher_args])
    return submit_slurm(args, [job], ["launch/submit.py", job.kind, *launcher_args])


def read_steps(run_dir: Path) -> list[dict]:
    """The metrics.jsonl records of a run."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):  # noqa: ANN001
    """Poll ``predicate()`` until truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
