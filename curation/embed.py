"""Embed: batched, parallel-decoded feature extraction into resumable fp16 chunks.

The images to embed are cut into fixed chunks of ``embed.chunk_size``; part ``i`` of ``n`` (a
torchrun rank or a Slurm array task) embeds chunks ``c`` with ``c % n == i``. Each chunk is
``chunk-XXXXXX.npy`` (fp16, L2-normalised rows) + ``.ids.npy`` + ``.json`` (decode failures,
image sizes), the JSON written last as the chunk's completion mark; a re-run skips complete
chunks. When every chunk exists, :func:`merge_chunks` concatenates them in id order.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from curation.backbone import FeatureModel, extract
from curation.config import EmbedConfig
from curation.ingest import read_item_bytes
from curation.store import NpyWriter, load_npy, save_json, save_npy
from dinosys.data.decode import decode_image
from dinosys.eval.images import preprocess

log = logging.getLogger(__name__)


class ImageRows(Dataset):
    """Decoded, preprocessed images of item rows; failures come back as a reason string."""

    def __init__(self, rows: dict[str, np.ndarray], cfg: EmbedConfig, mean: list[float],
                 std: list[float]) -> None:
        self.rows, self.cfg, self.mean, self.std = rows, cfg, mean, std

    def __len__(self) -> int:
        return len(self.rows["id"])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str, int, int]:
        r = self.rows
        size = self.cfg.img_size
        try:
            data = read_item_bytes(str(r["path"][i]), str(r["member"][i]), int(r["offset"][i]),
                                   int(r["size"][i]))
            img = decode_image(data, self.cfg.max_image_pixels)
            return preprocess(img, size, self.mean, self.std), int(r["id"][i]), "", *img.size
        except Exception as exc:  # any decode failure is recorded, never fatal
            reason = str(exc) if hasattr(exc, "reason") else f"{type(exc).__name__}: {exc}"
            return torch.zeros(3, size, size), int(r["id"][i]), reason.splitlines()[0][:200], 0, 0


def chunk_paths(out: Path, c: int) -> tuple[Path, Path, Path]:
    """Embedding, id and metadata files of chunk ``c``."""
    stem = out / f"chunk-{c:06d}"
    return stem.with_suffix(".npy"), Path(f"{stem}.ids.npy"), stem.with_suffix(".json")


def n_chunks(n_items: int, chunk_size: int) -> int:
    """How many chunks ``n_items`` make."""
    return max(1, -(-n_items // chunk_size))


def pending_chunks(out: Path, n_total: int, part: tuple[int, int]) -> list[int]:
    """This part's chunks that have no completion mark yet."""
    i, n = part
    return [c for c in range(i, n_total, n) if not chunk_paths(out, c)[2].is_file()]


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def embed_chunks(fm: FeatureModel, rows: dict[str, np.ndarray], cfg: EmbedConfig, out: Path,
                 part: tuple[int, int] = (0, 1), max_chunks: int | None = None,
                 progress: bool = True) -> int:
    """Embed this part's unfinished chunks of ``rows`` into ``out``; returns chunks written.

    ``max_chunks`` bounds the work of one call (a time-limited job continues in the next).
    """
    out.mkdir(parents=True, exist_ok=True)
    total = n_chunks(len(rows["id"]), cfg.chunk_size)
    todo = pending_chunks(out, total, part)
    if max_chunks is not None:
        todo = todo[:max_chunks]
    if not todo:
        return 0
    for c in todo:  # temporaries of a killed run (only this part's chunks: others may be writing)
        for stale in out.glob(f".chunk-{c:06d}.*"):
            stale.unlink(missing_ok=True)
    device = resolve_device(cfg.device)
    fm.model.to(device)
    batches: list[list[int]] = []
    owner: list[int] = []
    for c in todo:
        lo, hi = c * cfg.chunk_size, min(len(rows["id"]), (c + 1) * cfg.chunk_size)
        for b in range(lo, hi, cfg.batch_size):
            batches.append(list(range(b, min(hi, b + cfg.batch_size))))
            owner.append(c)
    loader = DataLoader(ImageRows(rows, cfg, fm.mean, fm.std), batch_sampler=batches,
                        num_workers=cfg.num_workers, persistent_workers=False,
                        pin_memory=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    acc: dict[str, list] = {"emb": [], "ids": [], "fail": [], "wh": []}
    bar = tqdm(total=sum(min(len(rows["id"]), (c + 1) * cfg.chunk_size) - c * cfg.chunk_size
                         for c in todo), desc=f"embed part {part[0]}/{part[1]}", unit="img",
               disable=not progress)
    written = 0
    for b, (images, ids, reasons, widths, heights) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        if amp is not None:
            with amp:
                feats = extract(fm, images, cfg.features, cfg.n_layers)
        else:
            feats = extract(fm, images, cfg.features, cfg.n_layers)
        acc["emb"].append(feats.cpu().numpy().astype(np.float16))
        acc["ids"].append(ids.numpy().astype(np.int64))
        acc["fail"].extend((int(i), r) for i, r in zip(ids.tolist(), reasons) if r)
        acc["wh"].append(np.stack([widths.numpy(), heights.numpy()], 1).astype(np.int32))
        bar.update(len(ids))
        if b + 1 == len(batches) or owner[b + 1] != owner[b]:
            _write_chunk(out, owner[b], acc)
            acc = {"emb": [], "ids": [], "fail": [], "wh": []}
            written += 1
    bar.close()
    return written


def _write_chunk(out: Path, c: int, acc: dict[str, list]) -> None:
    emb_path, ids_path, meta_path = chunk_paths(out, c)
    save_npy(emb_path, np.concatenate(acc["emb"]))
    save_npy(ids_path, np.concatenate(acc["ids"]))
    wh = np.concatenate(acc["wh"])
    save_json(meta_path, {"n": int(len(wh)), "failures": {str(i): r for i, r in acc["fail"]},
                          "width": wh[:, 0].tolist(), "height": wh[:, 1].tolist(),
                          "pid": os.getpid()})


def merge_chunks(out: Path, n_total: int, emb_path: Path) -> dict:
    """Concatenate all chunks (in order) into ``emb_path`` (an fp16 ``.npy`` written chunk by
    chunk, then renamed into place) and the ids/sizes/failure arrays.

    Rows that failed to decode are dropped from the embeddings and ids and listed in
    ``failed_ids`` with their reasons.
    """
    ids, widths, heights, failed, reasons, keeps = [], [], [], [], [], []
    dim = 0
    for c in range(n_total):
        emb_file, ids_path, meta_path = chunk_paths(out, c)
        meta = json.loads(meta_path.read_text())
        chunk_ids = load_npy(ids_path)
        bad = {int(k): v for k, v in meta["failures"].items()}
        keep = np.array([int(i) not in bad for i in chunk_ids], dtype=bool)
        keeps.append(keep)
        ids.append(chunk_ids[keep])
        widths.append(np.asarray(meta["width"], dtype=np.int32)[keep])
        heights.append(np.asarray(meta["height"], dtype=np.int32)[keep])
        failed.extend(bad.keys())
        reasons.extend(bad.values())
        dim = dim or int(load_npy(emb_file, mmap=True).shape[1])
    n_rows = int(sum(k.sum() for k in keeps))
    dest = NpyWriter(emb_path, (n_rows, dim), np.float16)
    for c in range(n_total):
        dest.write(load_npy(chunk_paths(out, c)[0])[keeps[c]])
    dest.close()
    return {"ids": np.concatenate(ids), "dim": dim,
            "width": np.concatenate(widths), "height": np.concatenate(heights),
            "failed_ids": np.asarray(failed, dtype=np.int64), "failed_reasons": reasons}
