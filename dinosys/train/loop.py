"""The training loop shared by every task: optimizer, lr / weight-decay schedule, clipping,
non-finite step skipping, logging, checkpoint/resume, preemption and periodic evaluators.

Nothing here is task-specific: the task (:class:`~dinosys.train.tasks.base.TrainTask`) builds
its modules, loader and parameter groups, prepares batches, computes the loss, runs its hooks
around the optimizer step and reports batch size, FLOPs and its own scheduled values.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dinosys.distributed.env import DistEnv
from dinosys.distributed.fsdp import autocast_context, set_gradient_sync
from dinosys.errors import UserError
from dinosys.progress import eta_seconds, progress_bar
from dinosys.train.device_step import finite_flag, guarded_step, read_scalars
from dinosys.train.metrics import MetricsWriter, peak_memory_gib, peak_tflops
from dinosys.train.optim import apply_schedule, build_optimizer, clip_grad_per_module
from dinosys.train.periodic_eval import PeriodicEvaluator
from dinosys.train.preempt import PreemptionFlag
from dinosys.train.schedules import LrSchedule
from dinosys.train.tasks.base import RunConfig, TrainTask
from dinosys.train.train_state import TrainState

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """Too many consecutive steps with a NaN/inf loss."""


@dataclass
class LoopResult:
    """How the loop ended."""

    status: str  # finished or preempted
    step: int
    nonfinite_steps: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # evaluator name -> result


def mean_over_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average scalar metrics across ranks (one all-reduce)."""
    if not values or not env.is_distributed:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    t /= env.world_size
    return dict(zip(keys, t.tolist()))


class Trainer:
    """Runs ``task`` on ``loader`` for ``cfg`` (see :func:`dinosys.train.run.run_train`)."""

    def __init__(self, task: TrainTask, loader: Any, cfg: RunConfig, env: DistEnv,
                 run_dir: Path, total_steps: int, total_batch: int,
                 evaluators: Sequence[PeriodicEvaluator] = (),
                 on_start: Callable[[int], None] | None = None) -> None:
        self.task, self.loader, self.cfg, self.env = task, loader, cfg, env
        self.on_start = on_start  # called with the start step once the checkpoint is loaded
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.total_batch = total_batch
        self.schedule = LrSchedule(cfg.optim, total_steps, total_batch)
        self.groups = task.param_groups()
        self.optimizer = build_optimizer(self.groups, cfg.optim)
        self.state = TrainState(task, self.optimizer, loader, self.run_dir / "checkpoints",
                                cfg.checkpoint, env, cfg.seed)
        self.metrics = MetricsWriter(self.run_dir, env.is_main, cfg.log.tensorboard)
        self.peak = peak_tflops(env.device, cfg.log.peak_tflops, cfg.dist.param_dtype)
        self.evaluators = list(evaluators)
        self.inject = Counter(cfg.debug_nonfinite_steps)

    # ------------------------------------------------------------------ one step

    def _micro_batches(self, it: Iterator) -> tuple[list[Any], float]:
        t0 = time.perf_counter()
        batches = [next(it) for _ in range(self.cfg.dist.grad_accum_steps)]
        return batches, time.perf_counter() - t0

    def _forward_backward(self, batches: list[Any], step: int
                          ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward + backward of every micro-batch. Returns (finite flag, logs), both on the
        device: nothing here waits for the device (dinosys.train.device_step)."""
        modules = list(self.task.trainable_modules().values())
        n = len(batches)
        ok = torch.ones((), device=self.env.device)
        logs: dict[str, Any] = {}
        for i, batch in enumerate(batches):
            batch = self.task.prepare_batch(batch)
            set_gradient_sync(modules, i == n - 1)
            with autocast_context(self.env, self.cfg.dist):
                out = self.task.forward_loss(batch, step)
            loss = out["loss"]
            if i == 0 and self.inject[step] > 0:
                self.inject[step] -= 1
                loss = loss * float("nan")
            ok = ok * finite_flag(loss)
            # accumulate the logs (new tensors) before backward: a task may log a view of a
            # parameter (SigLIP's logit bias), and FSDP2 frees the unsharded parameters'
            # storage when it reshards after backward; reading such a view later is a
            # use-after-free (a SIGSEGV on 2+ ranks)
            for key, value in out.items():
                v = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
                logs[key] = logs.get(key, 0.0) + v / n
            (loss / n).backward()
        return ok, logs

    def train_step(self, batches: list[Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """One optimisation step (with accumulation). Returns (applied, logs) as device tensors
        (read them with :func:`dinosys.train.device_step.read_scalars`, after the step); a
        non-finite loss or gradient norm leaves weights, optimizer and task state as they were,
        decided on the device where the optimizer is fused."""
        apply_schedule(self.optimizer, self.schedule.lr(step), self.schedule.weight_decay(step))
        saved_task_state = {k: v.clone() for k, v in self.task.extra_state().items()}
        self.optimizer.zero_grad(set_to_none=True)
        ok, logs = self._forward_backward(batches, step)
        self.task.before_optimizer_step(step)
        norms = clip_grad_per_module(self.task.trainable_modules(), self.cfg.optim.clip_grad)
        if norms:  # one collective for all norms: ranks may train different module counts
            # (distillation students on rank subgroups, one with a feature projection)
            ok = ok * finite_flag(torch.stack([n.detach().float() for n in norms.values()]))
        logs.update({f"grad_norm/{k}": v for k, v in norms.items()})
        guarded_step(self.optimizer, ok)
        self.optimizer.zero_grad(set_to_none=True)
        self.task.after_optimizer_step(step, ok)
        if saved_task_state:  # a skipped step keeps the task state (centres) it started with
            current = self.task.extra_state()
            self.task.load_extra_state({k: torch.where(ok > 0, current[k], v)
                                        for k, v in saved_task_state.items()})
        logs.update(self.schedule.at(step))
        logs.update(self.task.schedule_values(step))
        return ok > 0, logs

    # ------------------------------------------------------------------ the loop

    def run(self) -> LoopResult:
        """Train from the latest checkpoint (if resuming) to ``total_steps`` or preemption."""
        cfg = self.cfg
        start = self.state.restore() if cfg.checkpoint.resume else 0
        if self.on_start is not None:
            self.on_start(start)  # e.g. write config.yaml: the checkpoint accepted this config
        if self.env.is_main:  # also from step 0: a run killed before its first checkpoint
            from dinosys.train.metrics import truncate_after

            truncate_after(self.metrics.path, start)
        if start:
            log.info("resumed from step %d", start)
        preempt = PreemptionFlag().install()
        it = iter(self.loader)
        # in a log (not a terminal): one plain line per logged step, with loss, images/s, ETA
        bar = progress_bar(total=self.total_steps, initial=start, desc="train", unit="step",
                           disable=not (self.env.is_main and cfg.log.progress),
                           every_n=cfg.log.every_n_steps, dynamic_ncols=True)
        self._clock = (time.monotonic(), start)
        consecutive = skipped = 0
        last: dict[str, Any] = {}
        evals: dict[str, dict[str, Any]] = {}
        step = start
        window = {"t": 0.0, "wait": 0.0, "images": 0, "flops": 0.0}
        try:
            while step < self.total_steps:
                if preempt.agreed(self.env):
                    log.warning("preemption (%s): saving a checkpoint at step %d",
                                preempt.signal_name or "another rank", step)
                    self.state.save(step)
                    return LoopResult("preempted", step, skipped, last, evals)
                t0 = time.perf_counter()
                batches, wait = self._micro_batches(it)
                applied, logs = self.train_step(batches, step)
                if self.env.device.type == "cuda":
                    torch.cuda.synchronize(self.env.device)
                dt = time.perf_counter() - t0
                applied = bool(applied)  # the device is idle here: no extra wait
                if not applied:
                    skipped += 1
                    consecutive += 1
                    log.warning("step %d: non-finite loss or gradient, step skipped "
                                "(%d in a row, %d in total)", step, consecutive, skipped)
                    self.metrics.write({"step": step, "skipped_nonfinite": skipped,
                                        "consecutive_nonfinite": consecutive})
                    if consecutive >= cfg.max_consecutive_nonfinite:
                        latest = self.state.manager.latest()
                        raise NonFiniteLossError(
                            f"training stopped at step {step}: {consecutive} consecutive steps "
                            f"with a NaN/inf loss or gradient (max_consecutive_nonfinite="
                            f"{cfg.max_consecutive_nonfinite}); last good checkpoint: "
                            f"{latest or 'none'}; lower optim.base_lr or raise "
                            f"optim.warmup_epochs, then rerun to resume")
                    continue
                consecutive = 0
                step += 1
                n_img = sum(self.task.batch_size(b) for b in batches)
                window["t"] += dt
                window["wait"] += wait
                window["images"] += n_img
                window["flops"] += sum(self.task.step_flops(b) for b in batches)
                if step % cfg.log.every_n_steps == 0 or step == self.total_steps:
                    last = self._log(step, logs, window, skipped)
                    bar.set_postfix(loss=f"{last.get('loss', float('nan')):.3f}",
                                    images_per_s=f"{last['images_per_s']:.3g}")
                    window = {"t": 0.0, "wait": 0.0, "images": 0, "flops": 0.0}
                bar.update(1)
                for evaluator in self.evaluators:
                    if step % evaluator.every_n_steps == 0:
                        evals[evaluator.name] = self._evaluate(evaluator, step)
                every = cfg.checkpoint.every_n_steps
                if every and step % every == 0 and step < self.total_steps:
                    self.state.save(step)
            if self.state.last_saved_step != step:
                self.state.save(step)
        finally:
            bar.close()
            preempt.close()
            self.metrics.close()
        return LoopResult("finished", step, skipped, last, evals)

    def _log(self, step: int, logs: dict[str, Any], window: dict[str, float],
             skipped: int) -> dict[str, Any]:
        logs = mean_over_ranks(self.task.rank_logs(read_scalars(logs)), self.env)
        world = self.env.world_size
        t = max(window["t"], 1e-9)
        flops = window["flops"] * world
        record: dict[str, Any] = {"step": step, **logs}
        record["images_per_s"] = window["images"] * world / t
        record["data_wait_frac"] = window["wait"] / t
        record["tflops_per_s"] = flops / t / 1e12
        record["mfu"] = (flops / t / (self.peak * 1e12 * world)) if self.peak else None
        record["peak_mem_gib"] = peak_memory_gib(self.env.device)
        record["skipped_nonfinite"] = skipped
        record["bad_samples"] = self.state.bad_samples()  # by reason, all ranks, since step 0
        t0, first = self._clock
        elapsed = time.monotonic() - t0
        eta = eta_seconds(step - first, self.total_steps - step, elapsed)
        record["time"] = datetime.now(UTC).isoformat(timespec="seconds")
        record["elapsed_s"] = round(elapsed, 2)  # since this process started training
        record["eta_s"] = None if eta is None else round(eta, 1)
        self.metrics.write(record)
        log.debug("step %d %s", step, record)
        return record

    def _evaluate(self, evaluator: PeriodicEvaluator, step: int) -> dict[str, Any]:
        metrics = evaluator(self.task, step)
        self.metrics.write({"step": step, **metrics})
        log.info("step %d %s %s", step, evaluator.name, metrics)
        return evaluator.last if evaluator.last is not None else dict(metrics)
