"""Stages split into parts (Slurm array tasks, torchrun ranks, ``--local`` tasks) and merged.

Part ``i`` of ``n`` of a stage writes its outputs under ``work/<stage>/parts/<n>/`` and, last,
``part-<i>.json``: the stage digest (config and upstream inputs), ``n``, the id of any shared
input it read (the kNN index) and its peak RSS. While it runs it holds ``part-<i>.lock``, a file
whose mtime a thread refreshes every few seconds, so the same part started twice stops with one
line naming it, and a part that was killed (its lock goes stale) simply runs again.

The merge reads every record first and refuses, with one line naming the part, when a part is
missing, still running, was run with another config, another number of parts or another index;
only then does it write anything, and it writes the merged outputs before the stage's
done-marker, so nothing is ever merged half-way. A merge is done once: concurrent callers
(every part of the next stage) take ``merge.lock``; the others wait for the done-marker.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from curation.store import Stage, save_json
from dinosys.errors import UserError

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
STALE_S = 60.0  # a lock not refreshed for this long belongs to a dead process


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (rates that hold on a shared machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_gib() -> float:
    """This process's peak resident set size in GiB: ``VmHWM`` of its own address space
    (``ru_maxrss`` would also count the parent's resident set at the fork that started it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parts_dir(stage: Stage, n: int) -> Path:
    """Where the parts of a stage split ``n`` ways live."""
    return stage.dir / "parts" / str(n)


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "job": os.environ.get("SLURM_JOB_ID", "")}


def _alive(owner: dict, lock: Path) -> bool:
    """Whether the process holding ``lock`` still runs: same host -> its pid exists; another
    host -> its heartbeat is recent."""
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        return time.time() - lock.stat().st_mtime < STALE_S
    except FileNotFoundError:
        return False


def _read_owner(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _try_lock(lock: Path) -> bool:
    """Create ``lock`` exclusively (True), or take over a dead owner's lock."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_owner(lock)
            if owner is None:  # being written right now, or garbage from a crash
                time.sleep(0.2)
                owner = _read_owner(lock)
            if owner is not None and _alive(owner, lock):
                return False
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(_owner()))
        return True
    return False


@contextmanager
def held(lock: Path) -> Iterator[None]:
    """Refresh ``lock``'s mtime while the block runs; remove it afterwards."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(lock)
            except OSError:
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        lock.unlink(missing_ok=True)


@dataclass
class Part:
    """Part ``i`` of ``n`` of one stage."""

    stage: Stage
    i: int
    n: int

    @property
    def dir(self) -> Path:
        """The folder shared by the ``n`` parts."""
        return parts_dir(self.stage, self.n)

    @property
    def record(self) -> Path:
        """The part's completion record (written last)."""
        return self.dir / f"part-{self.i}.json"

    @property
    def lock(self) -> Path:
        """Held while the part runs."""
        return self.dir / f"part-{self.i}.lock"

    def name(self) -> str:
        """How error messages name the part."""
        return f"part {self.i}/{self.n} of stage '{self.stage.name}'"

    def file(self, suffix: str) -> Path:
        """An output file of this part, e.g. ``file('edges.npy')``."""
        return self.dir / f"part-{self.i}.{suffix}"

    def done(self, key: str) -> dict | None:
        """The record of this part if it finished with digest ``key``."""
        rec = _read_record(self.record)
        return rec if rec is not None and rec.get("digest") == key else None


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_part(part: Part, key: str, work: Callable[[], dict],
             extra: Callable[[], dict] | None = None) -> dict:
    """Run ``work`` as ``part`` unless it already finished with ``key``; write its record.

    ``work`` returns a JSON-able summary; ``extra()`` (e.g. the id of the index the part read),
    asked after the work, goes into the record so the merge can check that every part read the
    same shared inputs."""
    rec = part.done(key)
    if rec is not None:
        log.info("%s already done", part.name())
        return rec["summary"]
    if not _try_lock(part.lock):
        owner = _read_owner(part.lock) or {}
        raise UserError(f"{part.name()} is already running (pid {owner.get('pid')} on "
                        f"{owner.get('host')}); a part runs once at a time")
    with held(part.lock):
        t0, c0 = time.time(), cpu_seconds()
        summary = work()
        summary = {**summary, "seconds": round(time.time() - t0, 2),
                   "cpu_seconds": round(cpu_seconds() - c0, 2),
                   "peak_rss_gib": round(peak_rss_gib(), 3)}
        save_json(part.record, {"digest": key, "stage": part.stage.name, "part": part.i,
                                "n": part.n, **(extra() if extra is not None else {}),
                                "summary": summary})
    print(f"{part.name()}: {summary['seconds']} s, peak RSS {summary['peak_rss_gib']} GiB",
          file=sys.stderr, flush=True)
    return summary


def infer_n(stage: Stage) -> int:
    """The number of parts of a stage's only split (``--merge`` without a count)."""
    root = stage.dir / "parts"
    counts = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit()) \
        if root.is_dir() else []
    if not counts:
        raise UserError(f"stage '{stage.name}' has no parts in {root}; run `dinosys-curate "
                        f"{stage.name} CONFIG --part i/n` first")
    if len(counts) > 1:
        raise UserError(f"stage '{stage.name}' has parts split {counts} ways in {root}; say "
                        "which with --merge N")
    return counts[0]


def check_parts(stage: Stage, n: int, key: str, shared: dict | None = None) -> list[dict]:
    """Every part's record, after checking all of them (UserError naming the first bad part:
    missing, still running, another config, another split, another shared input)."""
    records = []
    for i in range(n):
        part = Part(stage, i, n)
        rec = _read_record(part.record)
        owner = _read_owner(part.lock)
        if owner is not None and _alive(owner, part.lock) and owner.get("pid") != os.getpid():
            raise UserError(f"{part.name()} is still running (pid {owner.get('pid')} on "
                            f"{owner.get('host')}); merge after it finished")
        if rec is None:
            raise UserError(f"{part.name()} is missing; run `dinosys-curate {stage.name} CONFIG "
                            f"--part {i}/{n}`, then merge")
        if rec.get("n") != n or rec.get("part") != i:
            raise UserError(f"{part.name()}: its record says part {rec.get('part')}/"
                            f"{rec.get('n')}; rerun it")
        if rec.get("digest") != key:
            raise UserError(f"{part.name()} was run with another config or input (digest "
                            f"{rec.get('digest')}, the merge expects {key}); rerun it")
        for name, value in (shared or {}).items():
            if rec.get(name) != value:
                raise UserError(f"{part.name()} read another {name} ({rec.get(name)}, the "
                                f"merge expects {value}); rerun it")
        records.append(rec)
    return records


def merge_once(stage: Stage, key: str, merge: Callable[[], dict],
               timeout_s: float = 24 * 3600, poll_s: float = 1.0) -> dict:
    """Run ``merge`` (which writes the outputs and then ``stage.mark_done(key, ...)``) in one
    process; concurrent callers wait for the done-marker. Returns the stage summary."""
    lock = stage.dir / "merge.lock"
    deadline = time.monotonic() + timeout_s
    while True:
        if stage.is_done(key):
            return stage.summary()
        if _try_lock(lock):
            with held(lock):
                if stage.is_done(key):
                    return stage.summary()
                return merge()
        if time.monotonic() > deadline:
            raise UserError(f"timed out waiting for the merge of stage '{stage.name}'")
        time.sleep(poll_s)


def wait_parts(stage: Stage, n: int, key: str, timeout_s: float = 24 * 3600,
               poll_s: float = 1.0) -> None:
    """Block until all ``n`` parts finished with ``key`` (ranks of one torchrun / --local job),
    or another rank already merged them (a merge may replace the parts' folder)."""
    deadline = time.monotonic() + timeout_s
    while not stage.is_done(key) and not all(Part(stage, i, n).done(key) for i in range(n)):
        if time.monotonic() > deadline:
            raise UserError(f"timed out waiting for the parts of stage '{stage.name}'")
        time.sleep(poll_s)


def complete_split(stage: Stage, key: str) -> int | None:
    """A number of parts whose every part finished with ``key`` (None if there is none)."""
    root = stage.dir / "parts"
    if not root.is_dir():
        return None
    for d in sorted(root.iterdir()):
        if d.name.isdigit():
            n = int(d.name)
            if all(Part(stage, i, n).done(key) for i in range(n)):
                return n
    return None


def split_stage(stage: Stage, key: str, part: tuple[int, int] | None, merge: int | bool,
                work: Callable[[int, int], dict], combine: Callable[[int, list[dict]], dict],
                extra: Callable[[], dict] | None = None,
                shared: Callable[[], dict] | None = None) -> dict:
    """One call of a split stage.

    ``part=(i, n)``: run part ``i`` (``work(i, n)``; ``extra()`` adds shared-input ids to its
    record). ``merge``: merge the parts (True: as many as there are; an int: that many) with
    ``combine(n, records)``, which writes the outputs and marks the stage done; ``shared()`` is
    what every record must hold. Neither: done -> its summary; all parts of a split done ->
    merge them; else run everything here as part 0/1 and merge."""
    if part is not None:
        return run_part(Part(stage, *part), key, lambda: work(*part), extra)

    def merged(n: int) -> Callable[[], dict]:
        def go() -> dict:
            records = check_parts(stage, n, key, shared() if shared is not None else None)
            return combine(n, records)
        return go

    if merge:
        if stage.is_done(key):
            return stage.summary()
        n = infer_n(stage) if merge is True else int(merge)
        return merge_once(stage, key, merged(n))
    if stage.is_done(key):
        return stage.summary()
    n = complete_split(stage, key)
    if n is None:
        run_part(Part(stage, 0, 1), key, lambda: work(0, 1), extra)
        n = 1
    return merge_once(stage, key, merged(n))
