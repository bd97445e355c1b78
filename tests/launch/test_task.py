"""launch.task's preemption plumbing in-process: early signals reach the work's own handler."""

from __future__ import annotations

import os
import signal
import threading
import time

from launch_helpers import counting_job, read_steps

from launch.submit import build_parser, run_local
from launch.task import PREEMPT_SIGNAL, _PreemptWatch


def _wait(event: threading.Event, timeout_s: float = 5.0) -> bool:
    return event.wait(timeout_s)


def test_signal_before_the_work_listens_is_forwarded_once() -> None:
    previous = signal.getsignal(PREEMPT_SIGNAL)
    watch = _PreemptWatch().install()
    try:
        os.kill(os.getpid(), PREEMPT_SIGNAL)  # arrives while only the launcher listens
        time.sleep(0.6)  # several polls of the watch thread: nothing to forward to yet
        assert watch.requested.is_set()
        got = threading.Event()
        calls = []

        def work_handler(signum, frame):  # noqa: ANN001
            calls.append(signum)
            got.set()

        signal.signal(PREEMPT_SIGNAL, work_handler)  # the trainer installs its own handler
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)  # handlers run in the main thread between bytecodes
        assert calls == [PREEMPT_SIGNAL]
        time.sleep(0.5)
        assert calls == [PREEMPT_SIGNAL]  # forwarded once, not on every poll
    finally:
        watch.close()
        signal.signal(PREEMPT_SIGNAL, previous)


def test_resumable_work_without_handler_triggers_the_requeue_callback() -> None:
    previous = signal.getsignal(PREEMPT_SIGNAL)
    requeued = threading.Event()
    watch = _PreemptWatch().install(on_signal=requeued.set)
    try:
        assert not _wait(requeued, 0.3)
        os.kill(os.getpid(), PREEMPT_SIGNAL)
        assert _wait(requeued)
    finally:
        watch.close()
        signal.signal(PREEMPT_SIGNAL, previous)


def test_local_run_restarts_after_preemption_without_lost_or_repeated_steps(tmp_path) -> None:
    """--local: a preempted 2-task job starts again from its checkpoint, like a requeue."""
    run = tmp_path / "run"
    args = build_parser().parse_args(["train", "--local", "--tasks-per-node", "2",
                                      "--max-requeues", "1", "--out", str(run)])
    summary = run_local(args, [counting_job(total_steps=8, step_s=0.05, self_signal_at=3)],
                        ["launch/submit.py", "train", "--local"])
    assert summary["status"] == "finished" and summary["restarts"] == 1
    steps = read_steps(run)
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert [s["restart"] for s in steps] == [0, 0, 0] + [1] * 5
    assert all(s["world_size"] == 2 for s in steps)
    assert (run / "submission" / "command.txt").is_file()
    # the preempted run's log says what happened, not "Job completed successfully"
    logs = [p.read_text() for p in sorted((run / "submitit").glob("*_0_log.err"))]
    [first] = [text for text in logs if "preempted at step" in text]
    assert "preempted at step 3: checkpoint saved; --local starts it again" in first
    assert "job task ended: preempted at step 3" in first
    assert "Job completed successfully" not in first
    assert any("Job completed successfully" in text for text in logs)  # the finished rerun
