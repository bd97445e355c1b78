"""Mutation check: does the test suite catch the bugs that matter?

Each mutant in ``tools/mutants.yaml`` is one small semantic change (``original`` -> ``replacement``
in ``file``) that a real bug could look like, with the test files that should catch it. For each
mutant this script copies the repository once into a temporary directory (git's tracked and
untracked-but-not-ignored files; the working tree is never edited), applies the mutant there,
runs only the covering tests (``-x``, a per-mutant timeout) with the package imported from the
copy, and restores the file. A mutant is *killed* when the tests fail (or time out) and
*survives* when they pass. Mutants marked ``equivalent`` (with the reason they cannot change
behaviour) are checked to still apply but are not run or counted.

A mutant whose file is missing or whose ``original`` snippet is not found exactly once is an
error, never skipped silently: after a refactor the list has to follow the code.

    python tools/mutation_check.py                  # every mutant; exit 1 below --min-ratio
    python tools/mutation_check.py --only ema-momentum-swapped knn-top5-from-top1
    python tools/mutation_check.py --list           # check every snippet applies, run nothing

Prints one line per mutant, the kill ratio and every survivor; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LIST = REPO / "tools" / "mutants.yaml"
KEYS = {"id", "file", "original", "replacement", "tests", "equivalent"}


class MutantListError(Exception):
    """The mutant list itself is malformed (not a stale snippet: that is a per-mutant error)."""


@dataclass
class Mutant:
    """One curated mutation and the tests that must kill it."""

    id: str
    file: str
    original: str
    replacement: str
    tests: list[str] = field(default_factory=list)
    equivalent: str | None = None  # the reason it cannot change behaviour (not run, not counted)


@dataclass
class Outcome:
    """What happened to one mutant."""

    mutant: Mutant
    status: str  # killed, survived, timeout, equivalent, error
    seconds: float = 0.0
    detail: str = ""


def load_mutants(path: Path) -> list[Mutant]:
    """Parse and validate the mutant list (unique ids, required keys, tests for real mutants)."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("mutants"), list):
        raise MutantListError(f"{path}: expected a mapping with a 'mutants' list")
    mutants, seen = [], set()
    for i, entry in enumerate(data["mutants"]):
        where = f"{path.name} entry {i}"
        if not isinstance(entry, dict):
            raise MutantListError(f"{where}: not a mapping")
        unknown = set(entry) - KEYS
        if unknown:
            raise MutantListError(f"{where}: unknown keys {sorted(unknown)}")
        for key in ("id", "file", "original", "replacement"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise MutantListError(f"{where}: '{key}' must be a non-empty string")
        m = Mutant(**entry)
        if m.id in seen:
            raise MutantListError(f"{where}: duplicate id {m.id!r}")
        seen.add(m.id)
        if m.original == m.replacement:
            raise MutantListError(f"{where} ({m.id}): replacement equals original")
        if m.equivalent is None and not (isinstance(m.tests, list) and m.tests
                                         and all(isinstance(t, str) for t in m.tests)):
            raise MutantListError(f"{where} ({m.id}): 'tests' must list the covering test files")
        mutants.append(m)
    return mutants


def check_applies(m: Mutant, root: Path) -> str | None:
    """None when ``m`` applies to the tree at ``root``; else why not (a stale mutant)."""
    path = root / m.file
    if not path.is_file():
        return f"file not found: {m.file}"
    count = path.read_text().count(m.original)
    if count != 1:
        return (f"snippet found {count} times in {m.file} (must be exactly once): "
                f"{m.original.splitlines()[0][:80]!r}")
    for test in m.tests:
        if not (root / test.split("::")[0]).exists():
            return f"covering test not found: {test}"
    return None


def copy_tree(src: Path, dst: Path) -> None:
    """Copy git's tracked and untracked-but-not-ignored files of ``src`` to ``dst``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=src, check=True, capture_output=True).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        source = src / rel
        if not source.is_file():  # deleted but not yet committed
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def copy_env(copy: Path) -> dict[str, str]:
    """The environment that makes the copy's packages win over any other checkout (the editable
    install, PYTHONPATH from the caller) and reuses the source tree's cached test data."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # restored files keep their size: no stale .pyc
    env.setdefault("DINOSYS_TEST_CACHE", str(REPO / ".cache" / "tests"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TQDM_DISABLE"] = "1"
    return env


def check_import_location(copy: Path, env: dict[str, str]) -> None:
    """Fail early unless ``dinosys`` and ``curation`` are imported from the copy."""
    code = "import dinosys, curation; print(dinosys.__file__); print(curation.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    for found in out:
        if not Path(found).resolve().is_relative_to(copy.resolve()):
            raise RuntimeError(f"the mutated copy is not what gets imported: {found} "
                               f"(expected under {copy})")


def pytest_cmd(copy: Path, tests: list[str], per_test_timeout: int) -> list[str]:
    """pytest on ``tests``: stop at the first failure, no cache, temporary files in the copy."""
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
            "--no-header", "-o", "addopts=--strict-markers", f"--timeout={per_test_timeout}",
            f"--basetemp={copy / '.pytest-tmp'}", *tests]


_RUNNING: set[int] = set()  # process groups of the pytest runs in flight
_STOP = threading.Event()  # set by SIGTERM/SIGINT: start no further mutant


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop_on_signal(signum: int, _frame: object) -> None:
    """SIGTERM/SIGINT: end the pytest runs (own sessions, so not reached by a group kill)."""
    _STOP.set()
    for pid in list(_RUNNING):
        _kill_group(pid)
    raise SystemExit(128 + signum)


def run_tests(copy: Path, env: dict[str, str], tests: list[str], timeout: int,
              per_test_timeout: int) -> tuple[str, str]:
    """('passed'|'failed'|'timeout', last line of the pytest output)."""
    with subprocess.Popen(pytest_cmd(copy, tests, per_test_timeout), cwd=copy, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True) as proc:
        _RUNNING.add(proc.pid)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)  # pytest and whatever it started (torchrun)
            proc.communicate()
            return "timeout", f"no result after {timeout} s"
        finally:
            _RUNNING.discard(proc.pid)
    lines = [ln for ln in output.splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    summary = (failed[0] if failed else lines[-1] if lines else f"exit {proc.returncode}")
    return ("passed" if proc.returncode == 0 else "failed"), summary[:160]


def run_mutant(m: Mutant, copy: Path, env: dict[str, str], timeout: int,
               per_test_timeout: int) -> Outcome:
    """Apply ``m`` to the copy, run its tests, restore the file."""
    problem = check_applies(m, copy)
    if problem:
        return Outcome(m, "error", detail=problem)
    if m.equivalent is not None:
        return Outcome(m, "equivalent", detail=m.equivalent)
    path = copy / m.file
    original_text = path.read_text()
    path.write_text(original_text.replace(m.original, m.replacement, 1))
    t0 = time.perf_counter()
    try:
        result, summary = run_tests(copy, env, m.tests, timeout, per_test_timeout)
    finally:
        path.write_text(original_text)
    status = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[result]
    return Outcome(m, status, time.perf_counter() - t0, summary)


def summarise(outcomes: list[Outcome], seconds: float, baseline: str | None) -> dict:
    counted = [o for o in outcomes if o.status in ("killed", "survived", "timeout")]
    killed = [o for o in counted if o.status != "survived"]
    return {
        "mutants": len(outcomes),
        "counted": len(counted),
        "killed": len(killed),
        "survived": len(counted) - len(killed),
        "equivalent": sum(o.status == "equivalent" for o in outcomes),
        "errors": sum(o.status == "error" for o in outcomes),
        "kill_ratio": round(len(killed) / len(counted), 4) if counted else None,
        "survivors": [o.mutant.id for o in counted if o.status == "survived"],
        "stale": [o.mutant.id for o in outcomes if o.status == "error"],
        "baseline": baseline,
        "seconds": round(seconds, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mutants", type=Path, default=DEFAULT_LIST, help="the mutant list (YAML)")
    p.add_argument("--only", nargs="+", default=None, metavar="ID", help="run these mutants")
    p.add_argument("--list", action="store_true",
                   help="only check that every mutant applies to this tree; run no test")
    p.add_argument("--timeout", type=int, default=240, help="seconds per mutant (all its tests)")
    p.add_argument("--test-timeout", type=int, default=120, help="seconds per single test")
    p.add_argument("--min-ratio", type=float, default=0.95, help="fail below this kill ratio")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="mutants run at once, each in its own copy (default: 2, or 1 on 1 CPU)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the unmutated run of the covering tests in the copy")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        mutants = load_mutants(args.mutants)
    except (OSError, yaml.YAMLError, MutantListError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in mutants})
        if unknown:
            print(f"error: unknown mutant ids {unknown}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.id in args.only]
    if args.list:
        outcomes = []
        for m in mutants:
            problem = check_applies(m, REPO)
            status = "error" if problem else ("equivalent" if m.equivalent else "applies")
            outcomes.append(Outcome(m, status, detail=problem or m.equivalent or ""))
            print(f"{status:10s} {m.id:40s} {m.file} {outcomes[-1].detail}")
        errors = [o.mutant.id for o in outcomes if o.status == "error"]
        print(json.dumps({"mutants": len(mutants), "errors": len(errors), "stale": errors}))
        return 1 if errors else 0

    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    with tempfile.TemporaryDirectory(prefix="dinosys-mutation-") as tmp:
        copies = [Path(tmp) / f"repo{j}" for j in range(max(1, args.jobs))]
        for copy in copies:  # one copy per worker: a mutant owns its copy while it runs
            copy_tree(REPO, copy)
            check_import_location(copy, copy_env(copy))
        baseline = None
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutants if m.equivalent is None
                                       for t in m.tests))
            result, summary = run_tests(copies[0], copy_env(copies[0]), tests, args.timeout * 4,
                                        args.test_timeout)
            baseline = f"{result} in {time.perf_counter() - t0:.0f} s"
            print(f"baseline (unmutated copy, {len(tests)} test files): {baseline}", flush=True)
            if result != "passed":
                print(f"error: the covering tests fail without any mutant: {summary}",
                      file=sys.stderr)
                print(json.dumps(summarise([], time.perf_counter() - t0, baseline)))
                return 1
        free: queue.Queue[Path] = queue.Queue()
        for copy in copies:
            free.put(copy)
        done = 0

        def work(m: Mutant) -> Outcome:
            if _STOP.is_set():
                return Outcome(m, "error", detail="interrupted")
            copy = free.get()
            try:
                return run_mutant(m, copy, copy_env(copy), args.timeout, args.test_timeout)
            finally:
                free.put(copy)

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            futures = [pool.submit(work, m) for m in mutants]
            for future in as_completed(futures):
                o = future.result()
                done += 1
                print(f"[{done:3d}/{len(mutants)}] {o.status.upper():10s} {o.mutant.id:40s} "
                      f"{o.seconds:6.1f}s  {o.detail}", flush=True)
        order = {m.id: i for i, m in enumerate(mutants)}
        outcomes = sorted((f.result() for f in futures), key=lambda o: order[o.mutant.id])

    result = summarise(outcomes, time.perf_counter() - t0, baseline)
    ratio = result["kill_ratio"]
    print(f"\nkilled {result['killed']}/{result['counted']} counted mutants "
          f"(kill ratio {ratio}); {result['equivalent']} equivalent, {result['errors']} errors; "
          f"{result['seconds']:.0f} s")
    for o in outcomes:
        if o.status == "survived":
            print(f"SURVIVOR {o.mutant.id}: {o.mutant.file}: {o.mutant.original.strip()!r} -> "
                  f"{o.mutant.replacement.strip()!r} (tests: {', '.join(o.mutant.tests)})")
        if o.status == "error":
            print(f"STALE    {o.mutant.id}: {o.detail}")
    print(json.dumps(result))
    failed = result["errors"] > 0 or (ratio is not None and ratio < args.min_ratio)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
