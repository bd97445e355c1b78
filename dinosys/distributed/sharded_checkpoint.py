"""Sharded, atomic, world-size-independent checkpoints (torch.distributed.checkpoint).

Layout of ``root`` (the run's ``checkpoints/`` folder)::

    step_00001250/          a committed checkpoint
        .metadata, __0_0.distcp, __1_0.distcp ...   DCP shards (each rank writes its own)
        extra.json          caller's extra + step, world size, time, state keys
        rank_states.json    per-rank RNG states (torch/cuda/numpy/python) and ``rank_state``
        COMPLETE            commit marker, written last before the rename
    latest                  text file naming the committed checkpoint to resume from
    .tmp-step_...-<uuid>/   a save in progress (or killed): ignored, removed by the next save

A save writes everything into the temp folder, waits for every rank, then rank 0 writes the JSON
files and the marker, fsyncs and renames the folder to ``step_XXXXXXXX`` (the commit) and
replaces ``latest`` atomically. A save killed at any point leaves the previous checkpoint
committed and pointed to.

Key naming (what ``load_backbone_state`` and DCP see): each entry of the ``state`` dict passed
to :meth:`CheckpointManager.save` becomes a top-level key; DCP flattens nested dicts with dots.
With ``state = {"student": student, "teacher": teacher, "optim": optimizer, ...}`` where
``teacher`` has a ``backbone`` submodule, the teacher backbone's tensors are stored as
``teacher.backbone.blocks.0.attn.qkv.weight`` etc. Module keys come from
``get_model_state_dict`` (FSDP2 DTensors stay sharded; ``torch.compile`` and activation
checkpointing wrapper prefixes are removed), optimizer keys from ``get_optimizer_state_dict``
(``optim.state.<param fqn>.exp_avg``...).

World size: model and optimizer tensors are resharded by DCP on load, so a checkpoint saved on
N ranks loads on M ranks (or in one process). Per-rank state that is not sharded (RNG states,
the data loader position passed as ``rank_state``) is gathered to rank 0 and stored as JSON.
On load at the same world size each rank gets its own back exactly; at a different world size
RNGs are re-seeded from ``(extra["seed"], step, rank)`` and ``rank_state`` is ``None`` while
``rank_states`` lists every saved rank's entry so that the data loader can re-split.

The ``latest`` pointer wins over scanning when it names a committed checkpoint (so a person can
roll back by editing it); a missing or corrupt pointer falls back to the newest committed one.
Nothing in a checkpoint runs code on load: DCP's ``.metadata`` pickle and its non-tensor values
are read through an allow-list (:mod:`dinosys.distributed.checkpoint_reader`); a damaged file is
a one-line UserError naming the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinosys.atomic import write_atomic
from dinosys.distributed.checkpoint_reader import SafeLoadPlanner, SafeReader
from dinosys.distributed.state_adapters import (
    OptimizerState,
    adapt_state,
    capture_rng_state,
    reseed_rng,
    restore_rng_state,
)
from dinosys.errors import UserError

__all__ = ["CheckpointManager", "CheckpointMismatchError", "OptimizerState", "capture_rng_state",
           "consolidated_state_dict", "is_checkpoint", "load_backbone_state", "resolve_checkpoint",
           "restore_rng_state"]

log = logging.getLogger(__name__)

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-" + STEP_PREFIX
TRASH_PREFIX = ".trash-"
COMPLETE = "COMPLETE"
EXTRA_FILE = "extra.json"
RANK_STATES_FILE = "rank_states.json"
POINTER = "latest"
FORMAT = "dinosys-checkpoint-v1"
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save/load without a process group; one process is a supported case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*intent is to (save|load) in a single process")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint of ``step``."""
    return f"{STEP_PREFIX}{step:08d}"


def is_checkpoint(path: Path) -> bool:
    """True if ``path`` is a committed checkpoint folder (marker and DCP metadata present)."""
    path = Path(path)
    return (path / COMPLETE).is_file() and (path / ".metadata").is_file()


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Collective sharded checkpoints under ``root`` with a ``latest`` pointer and pruning.

    ``keep_last`` newest checkpoints are kept, plus every step divisible by ``keep_every``
    (when > 0) forever; the checkpoint ``latest`` points to is never deleted.
    """

    def __init__(self, root: Path, keep_last: int = 3, keep_every: int = 0) -> None:
        if keep_last < 1:
            raise UserError(f"checkpoint keep_last must be >= 1, got {keep_last}")
        if keep_every < 0:
            raise UserError(f"checkpoint keep_every must be >= 0, got {keep_every}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_every = keep_every

    # ----------------------------------------------------------------- discovery

    def committed(self) -> list[tuple[int, Path]]:
        """Committed checkpoints as (step, path), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _STEP_RE.match(child.name)
            if match and child.is_dir() and is_checkpoint(child):
                found.append((int(match.group(1)), child))
        return sorted(found)

    def _pointed(self) -> Path | None:
        try:
            name = (self.root / POINTER).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not _STEP_RE.match(name):
            return None
        path = self.root / name
        return path if is_checkpoint(path) else None

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the one ``latest`` names, else the newest committed.

        Reads only the file system (no collective), so it works on any rank or without a
        process group. Temp folders and folders without the ``COMPLETE`` marker are ignored.
        """
        pointed = self._pointed()
        if pointed is not None:
            return pointed
        if (self.root / POINTER).exists():
            log.warning("checkpoint pointer %s is unreadable or names no committed checkpoint; "
                        "scanning %s", self.root / POINTER, self.root)
        found = self.committed()
        return found[-1][1] if found else None

    # ----------------------------------------------------------------- save

    def save(self, step: int, state: dict[str, Any], extra: dict | None = None,
             rank_state: dict | None = None) -> Path:
        """Save ``state`` collectively (call on every rank); return the committed folder.

        ``state`` maps names (no dots) to modules (FSDP2 or plain), optimizers, Stateful
        objects or dicts of tensors/values. ``extra`` (JSON data, e.g. ``seed``, config digest)
        is stored once; ``rank_state`` (JSON data, e.g. this rank's data loader position) is
        gathered from every rank together with its RNG states.
        """
        rank, world = _rank_world()
        if rank == 0:  # a killed or failed save's leftovers would take the space this one needs
            self._remove_leftovers()
        tag = [uuid.uuid4().hex[:12] if rank == 0 else None]
        if _distributed():
            dist.broadcast_object_list(tag, src=0)
        tmp = self.root / f"{TMP_PREFIX}{step:08d}-{tag[0]}"
        try:
            tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._save_failed(step, tmp, exc) from exc

        per_rank = {"rank": rank, "rng": capture_rng_state(), "rank_state": rank_state}
        gathered: list[Any] = [None] * world
        if _distributed():
            dist.all_gather_object(gathered, per_rank)
        else:
            gathered = [per_rank]

        try:
            with _single_process_quiet():
                dcp.save(adapt_state(state), storage_writer=dcp.FileSystemWriter(str(tmp)))
        except (Exception, CheckpointException) as exc:  # collective: every rank gets here
            if _os_error(exc) is None:
                if rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            raise self._save_failed(step, tmp, exc, remove=rank == 0) from exc
        if _distributed():
            dist.barrier()
        final = self.root / step_dir_name(step)
        failure: BaseException | None = None
        if rank == 0:
            info = dict(extra or {})
            info.update(format=FORMAT, step=int(step), world_size=world, time=time.time(),
                        state_keys=sorted(state))
            try:
                self._commit(tmp, final, info, gathered)
            except Exception as exc:  # every rank must hear of it, not wait in a barrier
                failure = exc
                if isinstance(exc, OSError):
                    failure = self._save_failed(step, tmp, exc)
                else:
                    shutil.rmtree(tmp, ignore_errors=True)
            else:
                try:
                    self.prune()
                except OSError as exc:  # the new checkpoint is committed: pruning can wait
                    log.warning("could not prune old checkpoints in %s: %s", self.root, exc)
        status = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        if _distributed():
            dist.broadcast_object_list(status, src=0)
        if failure is not None:
            raise failure
        if status[0] is not None:
            if status[0].startswith("UserError: "):
                raise UserError(status[0][len("UserError: "):])
            raise RuntimeError(f"checkpoint of step {step} failed on rank 0: {status[0]}")
        return final

    def _save_failed(self, step: int, tmp: Path, exc: BaseException,
                     remove: bool = True) -> UserError:
        """Remove the failed save's temp folder; the one-line error naming path and cause."""
        if remove:
            shutil.rmtree(tmp, ignore_errors=True)
        error = _os_error(exc) or exc
        cause = (f"{error.strerror} (errno {error.errno})"
                 if isinstance(error, OSError) and error.strerror else str(error))
        where = getattr(error, "filename", None) or tmp
        previous = self.latest()
        kept = (f"the previous checkpoint {previous} is intact" if previous is not None
                else "there is no earlier checkpoint")
        return UserError(f"checkpoint save of step {step} failed at {where}: {cause}; the "
                         f"partial save was removed and {kept}")

    def _remove_leftovers(self) -> None:
        """Delete temp and trash folders of killed or failed saves and prunes."""
        if not self.root.is_dir():
            return
        for child in self.root.iterdir():
            if child.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)

    def _commit(self, tmp: Path, final: Path, info: dict, rank_states: list) -> None:
        """Rank 0: write the JSON files and marker, then rename and repoint (the commit)."""
        write_atomic(tmp / EXTRA_FILE, json.dumps(info, indent=1, sort_keys=True) + "\n")
        write_atomic(tmp / RANK_STATES_FILE, json.dumps(rank_states) + "\n")
        write_atomic(tmp / COMPLETE, f"{info['step']}\n")
        _fsync_dir(tmp)
        trash = None
        if final.exists():  # the same step saved again (e.g. preempted right after a resume)
            trash = self.root / f"{TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        write_atomic(self.root / POINTER, final.name + "\n")
        _fsync_dir(self.root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        log.info("checkpoint %s committed", final)

    def prune(self) -> list[Path]:
        """Delete old checkpoints and leftovers of killed saves; return what was deleted."""
        found = self.committed()
        keep = {step for step, _ in found[-self.keep_last:]}
        if self.keep_every > 0:
            keep |= {step for step, _ in found if step % self.keep_every == 0}
        pointed = self._pointed()
        deleted = []
        for step, path in found:
            if step in keep or (pointed is not None and path == pointed):
                continue
            trash = self.root / f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)  # out of the scan at once, even if the delete is cut short
            shutil.rmtree(trash, ignore_errors=True)
            deleted.append(path)
        self._remove_leftovers()
        return deleted

    # ----------------------------------------------------------------- load

    def load(self, path: Path, state: dict[str, Any], restore_rng: bool = True) -> dict:
        """Load a checkpoint into ``state`` in place (collective); return its extra dict.

        Works at any world size (DCP reshards model and optimizer tensors). The returned dict
        holds the saved ``extra`` plus ``rank_state`` (this rank's saved ``rank_state``, or
        ``None`` when the world size changed), ``rank_states`` (every saved rank's),
        ``saved_world_size`` and ``same_world_size``. With ``restore_rng`` the RNGs are
        restored exactly (same world size) or re-seeded from ``(extra["seed"], step, rank)``.
        """
        path = resolve_checkpoint(path)
        info = _read_json(path / EXTRA_FILE)
        saved = _read_json(path / RANK_STATES_FILE)
        rank, world = _rank_world()
        adapted = adapt_state(state)
        saved_keys = list(SafeReader(str(path)).read_metadata().state_dict_metadata)
        for key, value in adapted.items():
            if isinstance(value, OptimizerState):
                head = key + "."
                value.expect([k[len(head):] for k in saved_keys if k.startswith(head)])
        try:
            with _single_process_quiet():
                dcp.load(adapted, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
        except (CheckpointException, ValueError, RuntimeError, EOFError, OSError,
                UserError) as exc:
            problem = _layout_mismatch(exc)
            if problem is None:
                raise _load_failure(path, exc) from exc
            raise CheckpointMismatchError(
                f"checkpoint {path} does not match what is being resumed ({problem}); resume "
                "with the config it was saved with, or use a new run directory") from exc
        same = len(saved) == world
        info.update(saved_world_size=len(saved), same_world_size=same,
                    rank_states=[entry["rank_state"] for entry in saved],
                    rank_state=saved[rank]["rank_state"] if same else None)
        if restore_rng:
            if same:
                restore_rng_state(saved[rank]["rng"])
            else:
                log.warning("checkpoint %s was saved on %d ranks, loading on %d: RNGs re-seeded "
                            "from (seed, step, rank)", path, len(saved), world)
                reseed_rng(int(info.get("seed", 0)), int(info["step"]), rank)
        if _distributed():
            dist.barrier()
        return info


_MISMATCH = re.compile(r"(Size mismatch[^\n]*|Missing key[^\n]*|Missing optimizer state[^\n]*)")


def _layout_mismatch(exc: BaseException) -> str | None:
    """The first 'size mismatch' / 'missing key' line DCP raised (on any rank), else None."""
    errors = [exc]
    if isinstance(exc, CheckpointException):
        errors = [failure[0] if isinstance(failure, tuple) else failure
                  for failure in exc.failures.values()]
    for error in errors:
        match = _MISMATCH.search(str(error))
        if match:
            return match.group(1).rstrip(".")
    return None


class CheckpointMismatchError(UserError):
    """The checkpoint holds other tensors (names or shapes) than the state being loaded."""


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed DCP call (on any rank), if that is what it was."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, CheckpointException):
        for failure in exc.failures.values():
            error = failure[0] if isinstance(failure, tuple) else failure
            while error is not None and not isinstance(error, OSError):
                error = error.__cause__ or error.__context__
            if error is not None:
                return error
    return None


def _load_failure(path: Path, exc: BaseException) -> BaseException:
    """What to raise for a failed ``dcp.load`` of ``path``: the UserError a safe read raised
    (on any rank), a one-line UserError for a damaged shard, else the error itself."""
    errors = [exc]
    if isinstance(exc, CheckpointException):
        errors = [failure[0] if isinstance(failure, tuple) else failure
                  for failure in exc.failures.values()]
    for error in errors:
        if isinstance(error, UserError):
            return error
    for error in errors:
        if isinstance(error, (EOFError, OSError, RuntimeError, ValueError)):
            text = str(error).strip().splitlines()
            return UserError(f"checkpoint {path} is damaged: a shard could not be read "
                             f"({type(error).__name__}: {text[0] if text else 'no detail'}); "
                             "resume from an older checkpoint")
    return exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {path.parent}: cannot read {path.name} ({exc})") from None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a checkpoint, a checkpoints root or a run directory.

    Raises UserError naming ``path`` when none is found there.
    """
    path = Path(path)
    if is_checkpoint(path):
        return path
    for root in (path, path / "checkpoints"):
        if root.is_dir():
            found = CheckpointManager(root).latest()
            if found is not None:
                return found
    if path.is_dir() and path.name.startswith((STEP_PREFIX, TMP_PREFIX)):
        raise UserError(f"{path} is an incomplete checkpoint (no {COMPLETE} marker: the save "
                        "was interrupted); use an older one or the checkpoints folder")
    raise UserError(f"{path} is not a checkpoint (expected a folder with {COMPLETE} and "
                    ".metadata, a checkpoints folder or a run directory)")


def load_backbone_state(ckpt_dir: Path,
                        prefix: str = "teacher.backbone") -> dict[str, torch.Tensor]:
    """Full tensors whose keys start with ``prefix`` (stripped), read in ONE process.

    Needs no process group (for export and evaluation); reads only those tensors' bytes.
    """
    path = resolve_checkpoint(Path(ckpt_dir))
    reader = SafeReader(str(path))
    metadata = reader.read_metadata()
    head = prefix.rstrip(".") + "."
    wanted = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
              for key, meta in metadata.state_dict_metadata.items()
              if key.startswith(head) and isinstance(meta, TensorStorageMetadata)}
    if not wanted:
        tops = sorted({key.split(".")[0] for key in metadata.state_dict_metadata})
        raise UserError(f"checkpoint {path} holds no tensors under '{prefix}' "
                        f"(top-level keys: {', '.join(tops)})")
    try:
        with _single_process_quiet():
            dcp.load(wanted, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    except (CheckpointException, ValueError, RuntimeError, EOFError, OSError) as exc:
        raise _load_failure(path, exc) from exc
    return {key[len(head):]: tensor for key, tensor in wanted.items()}


def consolidated_state_dict(model: nn.Module, rank: int = 0) -> dict[str, torch.Tensor]:
    """The full CPU state dict of a (possibly FSDP2-sharded) model, for export.

    Collective over the model's mesh: call it on every rank that holds the model. Global rank
    ``rank`` (a rank of that mesh) gets the full dict, the others an empty one. With ``rank``
    other than 0 (a model sharded over a subgroup of ranks), tensors are gathered one at a
    time, so no rank holds more than one full tensor it does not keep.
    """
    if not _distributed():
        return {k: v.detach().cpu().clone() for k, v in get_model_state_dict(model).items()}
    if rank == 0:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    keep = dist.get_rank() == rank
    out: dict[str, torch.Tensor] = {}
    for key, value in get_model_state_dict(model).items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()  # collective over the tensor's own mesh
        if keep:
            out[key] = value.detach().cpu().clone()
    return out
