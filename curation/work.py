"""The work directory of a curation run and what every stage reads from it: the ingested item
table, the embeddings (memory-mapped), the dedup pool table and the done-marker checks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from curation.config import CurationConfig, EmbedConfig
from curation.store import Stage, load_npy, load_table
from dinosys.errors import UserError


def work_dir(cfg: CurationConfig) -> Path:
    """The output directory of the run."""
    return Path(cfg.out)


def need(stage: Stage, command: str) -> str:
    """The done digest of an upstream stage; UserError naming the command to run when absent."""
    dig = stage.done_digest()
    if dig is None:
        raise UserError(f"stage '{stage.name}' has not finished in {stage.dir.parent}; "
                        f"run `dinosys-curate {command}` (or `run`) first")
    return dig


def items(cfg: CurationConfig) -> dict[str, np.ndarray]:
    """The ingested item table as numpy columns."""
    table = load_table(work_dir(cfg) / "ingest" / "items.parquet")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def pool_table(cfg: CurationConfig) -> dict[str, np.ndarray]:
    """The dedup stage's per-pool-image table as numpy columns."""
    t = load_table(work_dir(cfg) / "dedup" / "pool.parquet")
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


def embed_stages(cfg: CurationConfig) -> list[tuple[str, EmbedConfig]]:
    """The embedding passes: ``embed`` (clustering, retrieval, and dedup unless a copy model is
    set) and, with ``copy_embed``, ``embed_copy`` (dedup and decontamination only)."""
    stages = [("embed", cfg.embed)]
    if cfg.copy_embed is not None:
        stages.append(("embed_copy", cfg.copy_embed))
    return stages


def dedup_embed_stage(cfg: CurationConfig) -> str:
    """The embedding stage that dedup and decontamination read."""
    return "embed_copy" if cfg.copy_embed is not None else "embed"


def embeddings(cfg: CurationConfig, stage: str = "embed") -> tuple[np.ndarray, np.ndarray]:
    """(ids, fp16 embeddings memory-mapped) of every decoded image, sorted by id."""
    d = work_dir(cfg) / stage
    return load_npy(d / "ids.npy"), load_npy(d / "embeddings.npy", mmap=True)


def role_rows(cfg: CurationConfig, role: str,
              stage: str = "embed") -> tuple[np.ndarray, np.ndarray]:
    """(ids, row indices in ``stage``'s embeddings) of the decoded images with ``role``."""
    cols = items(cfg)
    ids, _ = embeddings(cfg, stage)
    role_ids = cols["id"][(cols["role"] == role) & (cols["status"] == "ok")]
    rows = np.searchsorted(ids, role_ids)
    found = (rows < len(ids)) & (ids[np.minimum(rows, len(ids) - 1)] == role_ids)
    return role_ids[found], rows[found]


def read_rows(emb: np.ndarray, rows: np.ndarray, block: int = 65_536) -> np.ndarray:
    """``emb[rows]`` as float32, read from the memory map ``block`` rows at a time."""
    out = np.empty((len(rows), emb.shape[1]), dtype=np.float32)
    for lo in range(0, len(rows), block):
        out[lo: lo + block] = emb[rows[lo: lo + block]]
    return out


def wait_for(stage: Stage, timeout_s: float = 24 * 3600, poll_s: float = 2.0) -> None:
    """Block until another process has finished ``stage``."""
    deadline = time.monotonic() + timeout_s
    while not stage.marker.is_file():
        if time.monotonic() > deadline:
            raise UserError(f"timed out waiting for stage {stage.name} in {stage.dir}")
        time.sleep(poll_s)
