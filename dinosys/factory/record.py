"""Completion records: ``OUT/<stage>/COMPLETE.json``, written atomically as a stage's last act.

A record holds the stage's digest (its config, its recipe file and the digests of the records
it read), its outputs and its key numbers. A stage with a record of the same digest is complete
and skipped; one without a record runs (and resumes: training from its checkpoint, curation from
its stage markers); a record of another digest is an error, never silently redone.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from dinosys.atomic import write_atomic

RECORD = "COMPLETE.json"


def record_path(out: Path, stage: str) -> Path:
    """Where stage ``stage`` of the pipeline in ``out`` records its completion."""
    return Path(out) / stage / RECORD


def read_record(out: Path, stage: str) -> dict | None:
    """The stage's completion record, or None when it has none (not finished)."""
    try:
        data = json.loads(record_path(out, stage).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "digest" in data else None


def write_record(out: Path, stage: str, digest: str, result: dict, seconds: float) -> dict:
    """Write the record (atomically) and return it."""
    record = {"stage": stage, "digest": digest, "seconds": round(seconds, 1),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    write_atomic(record_path(out, stage), json.dumps(record, indent=2, sort_keys=True,
                                                     default=str) + "\n")
    return record


def sha256_json(value: Any) -> str:
    """The hex SHA-256 of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()
