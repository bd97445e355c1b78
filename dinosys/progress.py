"""Progress output that suits both a terminal and a log file.

On a terminal (stderr is a TTY) :func:`progress_bar` is a tqdm bar. Anywhere else (Slurm job
logs, CI, a pipe) tqdm's carriage-return stream would pile thousands of updates into one line, so
the bar writes one plain line every ``DINOSYS_PROGRESS_EVERY_S`` seconds (default 30) instead,
and a last line when it closes:
``train: 1200/4000 step (30%) 12.5 step/s, elapsed 1:36, ETA 3:44, loss=0.412``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

EVERY_ENV = "DINOSYS_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0


def format_duration(seconds: float | None) -> str:
    """``1:02:03`` (h:mm:ss) or ``12:03`` (m:ss); ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta_seconds(done: int, remaining: int, elapsed: float) -> float | None:
    """Seconds left for ``remaining`` units at the average rate of the ``done`` ones so far
    (None before the first one)."""
    if done <= 0:
        return None
    return max(remaining, 0) * elapsed / done


class LineProgress:
    """tqdm's interface (``update``, ``set_postfix``, ``close``, iteration, ``with``) writing a
    plain line at most every ``every_s`` seconds."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None,
                 desc: str = "", unit: str = "it", initial: int = 0, every_s: float | None = None,
                 file: IO[str] | None = None, every_n: int | None = None) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.every_s = float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S)) if every_s is None \
            else every_s
        self.file = file
        self.every_n = every_n  # also (with a total: instead of every_s) a line every n units
        self.postfix = ""
        self.t0 = self.last = time.monotonic()
        self.closed = False
        self.written = 0

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress has no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self) -> str:
        """The current state as one line."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        head = f"{self.desc}: " if self.desc else ""
        eta = ""
        if self.total:
            eta = f", ETA {format_duration(self.eta_s())}"
        return (f"{head}{done} {self.unit}{pct} {rate:.3g} {self.unit}/s, elapsed "
                f"{format_duration(elapsed)}{eta}{post}")

    def eta_s(self) -> float | None:
        """Seconds to ``total`` at this run's average rate (None without a total)."""
        if not self.total:
            return None
        return eta_seconds(self.n - self.start_n, self.total - self.n,
                           time.monotonic() - self.t0)

    def _write(self) -> None:
        out = self.file or sys.stderr
        print(self.line(), file=out, flush=True)
        self.last = time.monotonic()
        self.written += 1

    def update(self, n: int = 1) -> None:
        """Advance by ``n``; write a line when ``every_s`` has passed since the last one."""
        self.n += n
        if self.every_n:
            if self.n % self.every_n == 0 or (self.total and self.n >= self.total):
                self._write()
        elif time.monotonic() - self.last >= self.every_s:
            self._write()

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the line (e.g. ``loss=0.412``)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Write the final line (once)."""
        if not self.closed:
            self.closed = True
            already = self.every_n and self.written and (
                self.n % self.every_n == 0 or (self.total and self.n >= self.total))
            if (self.n != self.start_n or self.written) and not already:
                self._write()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool | None = False,
                 leave: bool = True, every_n: int | None = None, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar on a terminal, a :class:`LineProgress` otherwise (a line every ``every_n``
    units when given, else every ``DINOSYS_PROGRESS_EVERY_S`` seconds); ``disable=True`` shows
    nothing (``disable=None``: nothing unless stderr is a terminal, like tqdm)."""
    tty = sys.stderr.isatty()
    if disable or (disable is None and not tty):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=True)
    if tty:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                    **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                        every_n=every_n)
