"""Fixtures for the curation tests: a small real-image input set and an exported backbone."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image


def _small(src: Path, dst: Path, size: int = 96, fmt: str = "PNG") -> None:
    img = Image.open(src).convert("RGB")
    img.thumbnail((size, size))
    img.save(dst, format=fmt)


@pytest.fixture(scope="session")
def random_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny dinosys ViT exported with save_native (mechanics tests only)."""
    from dinosys.export import save_native
    from dinosys.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("vit_tiny", img_size=32, patch_size=8, layerscale_init=None)
    return save_native(model.eval(), tmp_path_factory.mktemp("model") / "export")


@pytest.fixture()
def curation_inputs(tmp_path: Path, builtin_data: Path) -> dict:
    """Folder + file list + WebDataset sources with an exact duplicate, broken files, a missing
    path and captions; an evaluation folder."""
    from dinosys.data.shard_writer import ShardWriter

    root = tmp_path / "inputs"
    photos = root / "photos"
    photos.mkdir(parents=True)
    names = sorted(p for p in (builtin_data / "photos").iterdir() if p.suffix in (".png", ".jpg"))
    for p in names[:6]:
        _small(p, photos / f"{p.stem}.png")
    shutil.copy(photos / f"{names[0].stem}.png", photos / "exact_copy.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
    (photos / "empty.png").write_bytes(b"")
    mnist = sorted((builtin_data / "mnist" / "train").rglob("*.png"))
    lst = root / "list.txt"
    lst.write_text("\n".join(str(p) for p in mnist[:8]) + "\n" + str(root / "missing.png") + "\n")
    shards = root / "shards"
    with ShardWriter(shards, max_count=6) as writer:
        for i, p in enumerate(mnist[100:112]):
            writer.write({"__key__": f"s{i:04d}", "png": p.read_bytes(), "txt": f"digit {i}"})
    evald = root / "eval"
    evald.mkdir()
    buf = io.BytesIO()
    Image.open(photos / f"{names[1].stem}.png").save(buf, format="JPEG", quality=80)
    (evald / "eval0.jpg").write_bytes(buf.getvalue())
    return {"root": root, "photos": photos, "list": lst, "shards": shards, "eval": evald,
            "n_images": 6 + 1 + 2 + 9 + 12 + 1}


def write_config(path: Path, inputs: dict, model: Path, out: Path, **extra) -> Path:
    """A curation YAML over ``inputs`` (thresholds suited to an untrained backbone)."""
    cfg = {
        "name": "test",
        "out": str(out),
        "sources": [{"path": str(inputs["photos"]), "name": "photos"},
                    {"path": str(inputs["list"]), "name": "mnist_list"},
                    {"path": str(inputs["shards"]), "name": "mnist_shards"}],
        "embed": {"model": str(model), "img_size": 32, "batch_size": 4, "chunk_size": 8,
                  "num_workers": 0},
        "dedup": {"k": 8, "threshold": 0.99995, "decontam_threshold": 0.99995,
                  "eval_sources": [{"path": str(inputs["eval"]), "name": "evalset"}]},
        "cluster": {"levels": [4, 2], "n_iter": 5, "n_resample": 1},
        "shards": {"max_count": 5},
        "progress": False,
    }
    for key, value in extra.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(cfg))
    return path
