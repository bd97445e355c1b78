"""What runs inside every task of a submitted job: environment, preemption, requeue.

Preemption protocol (why not submitit's ``checkpoint()``): Slurm delivers USR2 ``--signal``
seconds before the time limit (and ``scancel --signal=USR2`` does the same) to every task.
submitit's own handler runs ``checkpoint()`` on global rank 0 only and exits from inside the
signal handler, but a sharded (DCP/FSDP) checkpoint needs every rank to take part. So the job
runs through :class:`Task` instead:

1. every task replaces submitit's USR2 handler with one that only sets a flag;
2. the work (``dinosys.train.run.run_train``) installs its own flag handler on every rank, agrees
   across ranks at the next step boundary, saves a checkpoint collectively and returns
   ``{"status": "preempted"}``; a signal that arrives before the work has installed its handler
   is re-delivered to it as soon as it has;
3. global rank 0 then runs ``scontrol requeue $SLURM_JOB_ID`` (the job keeps its id and run
   directory, so the rerun resumes from the newest checkpoint). Slurm holds a requeued job for
   AuthInfo's ``cred_expire`` (default 120 s) before it may start again; ``scontrol update
   JobId=<id> StartTime=now`` from outside lifts that. ``SLURM_RESTART_COUNT`` counts requeues; past
   ``max_requeues`` the job ends as preempted and can be resumed by resubmitting with ``--out``.

Work without its own handler that is resumable (curation stages keep per-chunk completion marks)
is requeued at once on USR2; other work (evaluation) just runs on until Slurm's time limit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PREEMPT_SIGNAL = signal.SIGUSR2


@dataclass
class TaskContext:
    """Where a task runs: its rank in the job, the job id, the run directory, restarts so far."""

    rank: int
    world_size: int
    local_rank: int
    job_id: str | None  # Slurm job id ("<array id>_<index>" for arrays); None for --local
    restart_count: int
    run_dir: Path
    executor: str  # "slurm" or "local"
    array_index: int | None = None
    preempt_requested: Callable[[], bool] = field(default=lambda: False, repr=False)


class _PreemptWatch:
    """Own USR2 handler; re-delivers an early signal once the work has its own handler."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._forwarded = False
        self._stop = threading.Event()
        self._on_signal: Callable[[], None] | None = None
        self._handler = self._handle  # one bound-method object, so `is` can recognise it

    def install(self, on_signal: Callable[[], None] | None = None) -> _PreemptWatch:
        self._on_signal = on_signal
        signal.signal(PREEMPT_SIGNAL, self._handler)
        threading.Thread(target=self._watch, name="dinosys-preempt-watch", daemon=True).start()
        return self

    def _handle(self, signum: int, frame: object) -> None:
        log.warning("caught %s", signal.Signals(signum).name)
        self.requested.set()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            if not self.requested.is_set():
                continue
            current = signal.getsignal(PREEMPT_SIGNAL)
            if current is not self._handler and callable(current) and not self._forwarded:
                # the work now listens for the signal itself: hand the early one over
                self._forwarded = True
                os.kill(os.getpid(), PREEMPT_SIGNAL)
            elif current is self._handler and self._on_signal is not None:
                self._on_signal()
                self._on_signal = None

    def close(self) -> None:
        self._stop.set()


def _layout(executor: str) -> tuple[int, int, int, str | None, int | None]:
    """(rank, world_size, local_rank, job_id, array_index), exporting torch's variables."""
    import submitit

    env = submitit.JobEnvironment()
    # CUDA_VISIBLE_DEVICES stays whole: dinosys.distributed.env picks cuda:LOCAL_RANK itself
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                          overwrite=True)
    job_id = env.job_id if executor == "slurm" else None
    index = int(env.array_task_id) if executor == "slurm" and env.array_task_id else None
    return env.global_rank, env.num_tasks, env.local_rank, job_id, index


def _slurm_job_id_for_control() -> str:
    """The id scontrol understands for this (array) job."""
    array_id, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_id}_{index}" if array_id and index else os.environ["SLURM_JOB_ID"]


class Task:
    """The callable submitit runs in every task: sets up the environment and runs ``work``.

    ``work(ctx) -> dict`` returns a summary with ``status`` ("finished", "preempted", ...).
    ``handles_preemption``: the work installs its own USR2 handler and returns
    ``status == "preempted"`` after a collective checkpoint. ``resumable``: without its own
    handler, the work can simply be restarted (it skips what is done), so USR2 requeues at once.
    """

    def __init__(self, work: Callable[[TaskContext], dict], run_dir: str, max_requeues: int = 3,
                 handles_preemption: bool = False, resumable: bool = False,
                 restart_count: int = 0) -> None:
        self.work = work
        self.run_dir = run_dir
        self.max_requeues = max_requeues
        self.handles_preemption = handles_preemption
        self.resumable = resumable
        self.restart_count = restart_count  # --local only; Slurm says SLURM_RESTART_COUNT

    def context(self) -> TaskContext:
        """This task's :class:`TaskContext` (exports RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
        executor = os.environ.get("SUBMITIT_EXECUTOR", "local")
        rank, world, local, job_id, index = _layout(executor)
        restarts = (int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) if executor == "slurm"
                    else self.restart_count)
        run_dir = self.run_dir
        if job_id:  # an array's elements share the run directory of the array (%A)
            master = job_id.split("_")[0]
            run_dir = run_dir.replace("%j", master).replace("%A", master)
        return TaskContext(rank=rank, world_size=world, local_rank=local, job_id=job_id,
                           restart_count=restarts, run_dir=Path(run_dir), executor=executor,
                           array_index=index)

    def may_requeue(self, ctx: TaskContext) -> bool:
        """Requeues left for this job (``SLURM_RESTART_COUNT`` < ``max_requeues``)."""
        if ctx.restart_count < self.max_requeues:
            return True
        log.error("job was preempted but already requeued %d times (--max-requeues %d): not "
                  "requeuing; resubmit with the same --out to resume", ctx.restart_count,
                  self.max_requeues)
        return False

    def requeue(self, ctx: TaskContext) -> bool:
        """Rank 0 on Slurm: requeue this job and let it start again at once."""
        from launch import slurm

        if ctx.executor != "slurm" or ctx.rank != 0 or not self.may_requeue(ctx):
            return False
        # Slurm holds a requeued job for AuthInfo's cred_expire (default 120 s) once its tasks
        # have ended; that cannot be lifted from inside the job (`scontrol update StartTime=now`
        # from outside can: launch.slurm.start_now)
        return slurm.requeue(_slurm_job_id_for_control())

    def __call__(self) -> dict[str, Any]:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        ctx = self.context()
        on_signal = None
        if not self.handles_preemption and self.resumable:
            on_signal = lambda: self.requeue(ctx)  # noqa: E731
        watch = _PreemptWatch().install(on_signal)
        ctx.preempt_requested = watch.requested.is_set
        log.info("task rank %d/%d (local %d), job %s, restart %d, run dir %s", ctx.rank,
                 ctx.world_size, ctx.local_rank, ctx.job_id or "local", ctx.restart_count,
                 ctx.run_dir)
        try:
            result = dict(self.work(ctx))
        finally:
            watch.close()
        result.setdefault("rank", ctx.rank)
        if result.get("status") == "preempted" and self.handles_preemption:
            requeued = self.requeue(ctx)
            if requeued:
                result["status"] = "requeued"
            outcome = preemption_outcome(result, ctx, requeued, self.max_requeues)
            if ctx.rank == 0:
                log.warning("%s", outcome)
            _reword_submitit_success(outcome)
        return result


def preemption_outcome(result: dict[str, Any], ctx: TaskContext, requeued: bool,
                       max_requeues: int) -> str:
    """One line saying what happened to a preempted run: at which step, the checkpoint, and
    whether (and as what) it was requeued."""
    step = result.get("step")
    where = f" at step {step}" if step is not None else ""
    ckpt = result.get("checkpoint")
    saved = f"checkpoint saved ({ckpt})" if ckpt else "checkpoint saved"
    if requeued:
        then = (f"requeued as Slurm job {ctx.job_id} (restart {ctx.restart_count + 1} of at most "
                f"{max_requeues}); the rerun resumes from the checkpoint")
    elif ctx.executor == "local":
        then = "--local starts it again from the checkpoint"
    else:
        then = (f"not requeued (restart {ctx.restart_count} of at most {max_requeues}); "
                f"resubmit with --out {ctx.run_dir} to resume")
    return f"preempted{where}: {saved}; {then}"


class _SuccessReword(logging.Filter):
    """Rewrites submitit's closing "Job completed successfully" of a preempted task."""

    def __init__(self, outcome: str) -> None:
        super().__init__()
        self.outcome = outcome

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() == "Job completed successfully":
            record.msg, record.args = f"job task ended: {self.outcome}", None
        return True


def _reword_submitit_success(outcome: str) -> None:
    # submitit logs "Job completed successfully" whenever the callable returns, and a preempted
    # run returns normally (its checkpoint is saved): that line cannot be avoided, only
    # reworded, so the log does not claim a finished job
    logging.getLogger("submitit").addFilter(_SuccessReword(outcome))
