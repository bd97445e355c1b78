"""Talking to Slurm: is there a cluster, which partitions, job states, requeue.

Everything here shells out to the Slurm client commands (sinfo, scontrol, squeue) so that it
works on any Slurm version and with or without accounting (slurmdbd); only ``scontrol`` and
``squeue`` are needed to follow a job, not ``sacct``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from dinosys.errors import UserError

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_S = 30


def _run(cmd: list[str], timeout: float = CLIENT_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no output"


def check_slurm() -> list[str]:
    """The partitions of the reachable cluster (default first); UserError when there is none.

    Checks, in order: ``sbatch`` on PATH, ``$SLURM_CONF`` (when set) is a readable file, and the
    controller answers ``sinfo``.
    """
    if shutil.which("sbatch") is None:
        raise UserError("no Slurm found: `sbatch` is not on PATH (load the Slurm module, or run "
                        "on this machine with --local)")
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise UserError(f"no Slurm found: SLURM_CONF={conf} is not a readable file (start the "
                        "local cluster with `eval \"$(bash tools/slurm_local.sh start)\"` or "
                        "unset it)")
    try:
        res = _run(["sinfo", "-h", "-o", "%P"])
    except subprocess.TimeoutExpired as exc:
        raise UserError(f"no Slurm found: `sinfo` did not answer within {CLIENT_TIMEOUT_S}s"
                        ) from exc
    if res.returncode != 0:
        hint = "" if conf else " (SLURM_CONF is not set)"
        raise UserError(f"no Slurm found: `sinfo` failed{hint}: {_first_line(res.stderr)}")
    names = [p.strip() for p in res.stdout.split() if p.strip()]
    if not names:
        raise UserError("the Slurm cluster has no partition (sinfo -h -o %P printed nothing)")
    default = [p[:-1] for p in names if p.endswith("*")]
    others = [p.rstrip("*") for p in names if not p.endswith("*")]
    return list(dict.fromkeys(default + others))


def check_partition(partition: str | None, partitions: list[str]) -> str | None:
    """``partition`` if the cluster has it (None keeps Slurm's default); UserError otherwise."""
    if partition is None or partition in partitions:
        return partition
    raise UserError(f"unknown Slurm partition '{partition}'; this cluster has: "
                    f"{', '.join(partitions)}")


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (JobState, Reason, Restarts, ...); {} once forgotten."""
    res = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    fields: dict[str, str] = {}
    for token in res.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


REQUEUE_SETTLE_S = 3.0
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def wait_for_job(job_id: str, timeout_s: float, poll_s: float = 1.0,
                 start_requeued_now: bool = False) -> dict[str, str]:
    """Poll until the job reaches a final state; returns its scontrol fields.

    ``start_requeued_now``: a requeued job is held (BeginTime, AuthInfo's cred_expire, 120 s by
    default) before it may run again; start it soon instead (tests, a local cluster).
    """
    deadline = time.monotonic() + timeout_s
    fields: dict[str, str] = {}
    held_since: float | None = None
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        state = fields.get("JobState", "UNKNOWN")
        if state in FINAL_STATES:
            return fields
        held = state == "PENDING" and fields.get("Reason") == "BeginTime"
        if start_requeued_now and held:
            held_since = held_since or time.monotonic()
            # slurmd refuses a credential issued in the same second as the previous run's
            # revocation ("Job credential revoked": the job FAILS): let a few seconds pass
            if time.monotonic() - held_since >= REQUEUE_SETTLE_S:
                start_now(job_id)
                held_since = None
        elif not held:
            held_since = None
        time.sleep(poll_s)
    raise TimeoutError(f"Slurm job {job_id} not finished after {timeout_s:.0f}s "
                       f"(state {fields.get('JobState', 'UNKNOWN')})")


def requeue(job_id: str) -> bool:
    """``scontrol requeue`` this job (it returns to PENDING with the same id); True on success."""
    res = _run(["scontrol", "requeue", str(job_id)])
    if res.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, _first_line(res.stderr))
        return False
    log.warning("requeued Slurm job %s", job_id)
    return True


def start_now(job_id: str, attempts: int = 5) -> bool:
    """Lift the BeginTime hold Slurm puts on a requeued job (harmless otherwise). Call it a few
    seconds after the requeue: a start within the same second as the revocation of the previous
    run's credential fails the job."""
    for _ in range(attempts):
        res = _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        if res.returncode == 0:
            return True
        time.sleep(0.5)
    log.info("could not move the start of job %s forward: %s", job_id, _first_line(res.stderr))
    return False


ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}


def test_only(script: str) -> str | None:
    """``sbatch --test-only`` of an sbatch script: None when Slurm would accept the job, else
    its refusal in one line (no GPU on the partition, more nodes than it has, a time limit
    above its maximum...). Nothing is queued."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh") as fh:
        fh.write(script)
        fh.flush()
        res = _run(["sbatch", "--test-only", fh.name])
    if res.returncode == 0:
        return None
    lines = [line.strip() for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "failure" in line.lower()]
    return "; ".join(dict.fromkeys(errors or lines[-1:])) or f"exit code {res.returncode}"
