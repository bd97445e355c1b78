"""Geometric verification of dedup candidates (curation.verify): real photos, real copy edits,
collages that share a tile, resumable blocks, and the pipeline stage that uses it."""

from __future__ import annotations

import builtins
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from curation import verify
from curation.cli import main
from curation.config import VerifyConfig
from curation.demo_pool import near_copies
from dinosys.errors import ConfigError, UserError

CFG = VerifyConfig()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _features(img: Image.Image) -> verify.Features:
    return verify.extract_features(verify.grey_image(_png(img), CFG.max_side, 10**8))


@pytest.fixture(scope="module")
def photos(builtin_data: Path) -> dict[str, Image.Image]:
    out = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = Image.open(next((builtin_data / "photos").glob(f"{name}.*"))).convert("RGB")
        img.thumbnail((192, 192))
        out[name] = img
    return out


def test_every_copy_edit_is_confirmed(photos: dict[str, Image.Image]) -> None:
    for name, img in photos.items():
        base = _features(img)
        edits = {**near_copies(img), "flip": ImageOps.mirror(img)}
        for kind, copy in edits.items():
            m = verify.verify_pair(base, _features(copy), CFG)
            want = verify.CONFIRMED_FLIP if kind == "flip" else verify.CONFIRMED
            assert m.status == want, (name, kind, m)
            assert m.inliers >= CFG.min_inliers and m.overlap >= CFG.min_overlap
            assert m.correlation >= CFG.min_correlation


def test_flip_is_rejected_when_not_allowed(photos: dict[str, Image.Image]) -> None:
    img = photos["chelsea"]
    cfg = VerifyConfig(flip=False)
    m = verify.verify_pair(_features(img), _features(ImageOps.mirror(img)), cfg)
    assert m.status == verify.REJECTED


def test_different_photos_are_rejected(photos: dict[str, Image.Image]) -> None:
    names = sorted(photos)
    feats = {n: _features(photos[n]) for n in names}
    for a in names:
        for b in names:
            if a < b:
                assert verify.verify_pair(feats[a], feats[b], CFG).status == verify.REJECTED


def _grid(tiles: list[Image.Image], cols: int, cell: int = 64) -> Image.Image:
    rows = (len(tiles) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * cell, rows * cell))
    for k, t in enumerate(tiles):
        canvas.paste(t.resize((cell, cell)), ((k % cols) * cell, (k // cols) * cell))
    return canvas


def test_collages_sharing_a_tile_are_rejected(photos: dict[str, Image.Image]) -> None:
    """The same crop of a photo in two otherwise different mosaics: many RANSAC inliers, but
    they agree inside one tile only, so this is not a copy. The same mosaic re-encoded is."""
    p = photos
    shared = p["astronaut"].crop((40, 20, 140, 120))
    a = _grid([shared, p["coffee"].crop((0, 0, 90, 90)), p["rocket"].crop((10, 40, 100, 130)),
               p["chelsea"].crop((60, 0, 150, 90))], cols=2)
    b = _grid([p["rocket"].crop((50, 0, 140, 90)), shared, p["chelsea"].crop((0, 30, 90, 120)),
               p["coffee"].crop((60, 40, 150, 130))], cols=2)
    fa, fb = _features(a), _features(b)
    m = verify.verify_pair(fa, fb, CFG)
    assert m.status == verify.REJECTED, m
    assert m.inliers >= CFG.min_inliers  # the shared tile does align
    assert verify.verify_pair(fa, _features(near_copies(a)["jpeg"]), CFG).status > 0


def test_flat_images_have_no_evidence() -> None:
    grad = Image.fromarray(np.tile(np.linspace(0, 255, 128, dtype=np.uint8), (128, 1)))
    other = ImageOps.flip(grad.rotate(90))
    m = verify.verify_pair(_features(grad), _features(other), CFG)
    assert m.status == verify.REJECTED


def _edges_fixture(photos: dict[str, Image.Image], root: Path) -> tuple[list[Path], np.ndarray,
                                                                       np.ndarray]:
    files = []
    for name, img in photos.items():
        for kind, copy in (("orig", img), ("jpeg", near_copies(img)["jpeg"])):
            path = root / f"{name}_{kind}.png"
            copy.save(path)
            files.append(path)
    n = len(files)
    i, j = np.triu_indices(n, 1)
    return files, i, j


def test_verify_edges_blocks_resume(tmp_path: Path, photos: dict[str, Image.Image]) -> None:
    files, i, j = _edges_fixture(photos, tmp_path)
    cfg = VerifyConfig(block_size=7)
    out = tmp_path / "blocks"
    res = verify.verify_edges(i, j, lambda r: files[r].read_bytes(), cfg, out, progress=False)
    same = np.array([files[a].name.split("_")[0] == files[b].name.split("_")[0]
                     for a, b in zip(i, j)])
    np.testing.assert_array_equal(res.confirmed, same)
    blocks = sorted(out.glob("block-*.npy"))
    assert len(blocks) == (len(i) + 6) // 7
    # a killed run left blocks 0 and 1: a re-run takes them as they are and computes the rest
    marker = np.load(blocks[1])
    marker[:, 3] = 0.123
    np.save(blocks[1], marker)
    for b in blocks[2:]:
        b.unlink()
    calls = []

    def load(r: int) -> bytes:
        calls.append(r)
        return files[r].read_bytes()

    again = verify.verify_edges(i, j, load, cfg, out, progress=False)
    np.testing.assert_allclose(again.correlation[7:14], 0.123)
    np.testing.assert_array_equal(again.confirmed[14:], res.confirmed[14:])
    assert set(calls) == set(i[14:]) | set(j[14:])


def test_unreadable_image_is_counted_not_fatal(tmp_path: Path,
                                               photos: dict[str, Image.Image]) -> None:
    files, i, j = _edges_fixture(photos, tmp_path)
    files[0].write_bytes(b"not an image")
    res = verify.verify_edges(i[:3], j[:3], lambda r: files[r].read_bytes(), CFG,
                              tmp_path / "b", progress=False)
    assert (res.status == verify.UNDECODABLE).all()


def test_config_is_checked() -> None:
    for bad in ({"min_overlap": 1.5}, {"min_inliers": 2}, {"grid": 0}, {"ratio": 2.0}):
        with pytest.raises(ConfigError, match="dedup.verify"):
            VerifyConfig(**bad)


def test_missing_opencv_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("No module named 'cv2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    with pytest.raises(UserError, match=r"dinosys\[verify\]"):
        verify.extract_features(np.zeros((32, 32), np.uint8))


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_pipeline_keeps_copy_groups_only_for_verified_pairs(tmp_path: Path, source: str,
                                                            photos: dict[str, Image.Image],
                                                            random_export: Path) -> None:
    """An untrained backbone with a threshold that joins everything: without verification all
    images fall into one group; with it, only the planted copy pairs do. Verification reads the
    images back from the source, a folder or WebDataset shards (tar members by offset)."""
    from dinosys.data.shard_writer import ShardWriter

    pool = tmp_path / "pool"
    pool.mkdir()
    files, _, _ = _edges_fixture(photos, pool)
    if source == "shards":
        with ShardWriter(tmp_path / "shards", max_count=3) as writer:
            for k, f in enumerate(files):
                writer.write({"__key__": f"{k:04d}", "png": f.read_bytes()})
        pool = tmp_path / "shards"
    out = tmp_path / "w"
    cfg = {"name": "v", "out": str(out), "progress": False,
           "sources": [{"path": str(pool), "name": "pool"}],
           "embed": {"model": str(random_export), "img_size": 32, "batch_size": 4,
                     "num_workers": 0},
           "dedup": {"k": 8, "threshold": -1.0, "verify": {"enabled": True, "block_size": 5}},
           "cluster": {"levels": [2], "n_iter": 3, "n_resample": 0}}
    path = tmp_path / "v.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["run", str(path)]) == 0
    done = json.loads((out / "dedup" / "DONE.json").read_text())["summary"]
    assert done["verify_candidates"] == len(files) * (len(files) - 1) // 2
    assert done["verify_confirmed"] == len(photos)
    assert done["near_duplicates"] == len(photos)
    status = np.load(out / "dedup" / "edges_verified.npy")
    assert (status >= 0).all() and int((status > 0).sum()) == len(photos)
    assert list((out / "dedup").glob("verify-*/block-*.npy"))
    assert (out / "shards" / "report" / "verification.png").stat().st_size > 1000
    assert "geometric verification\non" in (out / "shards" / "curation_report.html").read_text()
    # pairs at or above accept_above are taken without verification
    assert main(["dedup", str(path), "dedup.verify.accept_above=-1.0"]) == 0
    done = json.loads((out / "dedup" / "DONE.json").read_text())["summary"]
    assert done["verify_accepted_unchecked"] == done["verify_candidates"]
    assert done["verify_confirmed"] == 0 and done["near_duplicates"] == len(files) - 1
    assert (np.load(out / "dedup" / "edges_verified.npy") == verify.ACCEPTED).all()
    # the threshold alone merges everything
    assert main(["dedup", str(path), "dedup.verify.enabled=false"]) == 0
    done = json.loads((out / "dedup" / "DONE.json").read_text())["summary"]
    assert done["near_duplicates"] == len(files) - 1


def test_opencv_error_on_a_pair_is_logged_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    photos: dict[str, Image.Image]) -> None:
    import cv2

    files, i, j = _edges_fixture(photos, tmp_path)

    def broken(*args, **kwargs):
        raise cv2.error("degenerate geometry")

    monkeypatch.setattr(verify, "verify_pair", broken)
    res = verify.verify_edges(i[:4], j[:4], lambda r: files[r].read_bytes(), CFG,
                              tmp_path / "b", progress=False)
    assert (res.status == verify.REJECTED).all()
