"""kNN protocol against a direct implementation, and the run_knn entry point on real images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinosys.errors import UserError
from dinosys.eval.knn import knn_accuracy, run_knn


def direct_knn(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, k: int,
               temperature: float, n_classes: int) -> torch.Tensor:
    """One query at a time, written out: top-k cosine neighbours, vote exp(sim / T)."""
    preds = []
    for q in val:
        sims = [(float(q @ t), int(label)) for t, label in zip(train, train_labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * n_classes
        for sim, label in sims[:k]:
            votes[label] += float(torch.tensor(sim / temperature).exp())
        preds.append(max(range(n_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def test_knn_matches_direct_implementation() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(7, 16, generator=g)
    train_labels = torch.randint(0, 7, (200,), generator=g)
    val_labels = torch.randint(0, 7, (60,), generator=g)
    train = F.normalize(centers[train_labels] + 1.2 * torch.randn(200, 16, generator=g), dim=-1)
    val = F.normalize(centers[val_labels] + 1.2 * torch.randn(60, 16, generator=g), dim=-1)
    result = knn_accuracy(train, train_labels, val, val_labels, 7, ks=(1, 5, 20),
                          temperature=0.07)
    for k in (1, 5, 20):
        expected = (direct_knn(train, train_labels, val, k, 0.07, 7) == val_labels).float().mean()
        assert result["top1"][str(k)] == pytest.approx(float(expected)), k
    assert 0.3 < result["top1"]["20"] < 1.0  # a task that is neither trivial nor hopeless
    assert all(result["top5"][k] >= result["top1"][k] for k in result["top1"])


def test_temperature_changes_votes() -> None:
    # two near neighbours of class 0 vs one exact match of class 1: T decides
    train = F.normalize(torch.tensor([[1.0, 0.3], [1.0, -0.3], [1.0, 0.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1])
    val = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    sharp = knn_accuracy(train, labels, val, torch.tensor([1]), 2, ks=(3,), temperature=0.02)
    flat = knn_accuracy(train, labels, val, torch.tensor([1]), 2, ks=(3,), temperature=10.0)
    assert sharp["top1"]["3"] == 1.0 and flat["top1"]["3"] == 0.0


@pytest.fixture(scope="module")
def small_mnist(builtin_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """30 train / 10 val real MNIST digits per class for classes 0-4."""
    root = tmp_path_factory.mktemp("mnist_small")
    for split, n in (("train", 30), ("val", 10)):
        for label in range(5):
            src = sorted((builtin_data / "mnist" / split / str(label)).iterdir())[:n]
            dst = root / split / str(label)
            dst.mkdir(parents=True)
            for p in src:
                shutil.copy(p, dst / p.name)
    return root / "train", root / "val"


def test_run_knn_random_baseline_on_real_images(small_mnist: tuple[Path, Path]) -> None:
    train, val = small_mnist
    result = run_knn("random:vit_tiny", train, val, ks=(5,), batch_size=64)
    assert result["n_train"] == 150 and result["n_val"] == 50
    assert result["image_size"] == 28 and result["feature_dim"] == 192
    assert 0.0 <= result["top1"]["5"] <= 1.0 and "top5" not in result  # 5 classes: no top-5


def test_run_knn_bad_inputs(small_mnist: tuple[Path, Path], tmp_path: Path) -> None:
    train, val = small_mnist
    with pytest.raises(UserError, match="not found"):
        run_knn("random:vit_tiny", tmp_path / "missing", val)
    with pytest.raises(UserError, match="does not exist"):
        run_knn(str(tmp_path / "no_model"), train, val)
    with pytest.raises(UserError, match="positive"):
        run_knn("random:vit_tiny", train, val, ks=(0,))


def test_streamed_features_equal_preloaded(builtin_data: Path) -> None:
    """Large evaluation sets stream through DataLoader workers instead of living in memory; the
    features must be the same as from the preloaded tensor."""
    from dinosys.eval.features import extract_features
    from dinosys.eval.images import load_image_folder
    from dinosys.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("vit_tiny", img_size=16, patch_size=4, layerscale_init=None).eval()
    root = builtin_data / "digits" / "val"
    preloaded = load_image_folder(root, 16)
    streamed = load_image_folder(root, 16, preload_bytes=0)
    assert preloaded.images is not None and streamed.images is None
    assert torch.equal(preloaded.labels, streamed.labels)
    a = extract_features(model, preloaded, ["cls"], batch_size=64)["cls"]
    b = extract_features(model, streamed, ["cls"], batch_size=64)["cls"]
    assert a.shape == (len(preloaded), model.embed_dim)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
