"""Shared test set-up: offline guard, marker gating, cached embedded data, a tiny export."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DINOSYS_TEST_CACHE", REPO / ".cache" / "tests"))

_real_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address):  # type: ignore[no-untyped-def]
    """Tests run offline: refuse connections to anything but this machine."""
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            local = ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = host in ("localhost", socket.gethostname())
        if not local:
            raise OSError(f"tests run offline: connection to {address!r} refused by conftest")
    return _real_connect(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA; skip `slurm` tests without a cluster unless required."""
    has_cuda = _cuda_available()
    has_slurm = bool(os.environ.get("SLURM_CONF"))
    require_slurm = os.environ.get("DINOSYS_REQUIRE_SLURM") == "1"
    for item in items:
        # markers, not keywords: keywords also hold path parts (a checkout under .../gpu/)
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if item.get_closest_marker("slurm") and not has_slurm and not require_slurm:
            reason = "no local Slurm (run tools/slurm_local.sh start)"
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def builtin_data() -> Path:
    """The embedded real data (MNIST, digits, photos + shards), built once and cached."""
    from dinosys.data.builtin import build_builtin

    out = CACHE / "builtin"
    build_builtin(out)
    return out


@pytest.fixture
def small_digits(builtin_data: Path, tmp_path: Path) -> Path:
    """``tmp_path/digits/{train,val}/{0,1,2}``: 10 train and 4 val images per class of the
    embedded digits, for evaluations inside tests (periodic kNN)."""
    data = tmp_path / "digits"
    for split, per_class in (("train", 10), ("val", 4)):
        for c in ("0", "1", "2"):
            (data / split / c).mkdir(parents=True)
            for path in sorted((builtin_data / "digits" / split / c).iterdir())[:per_class]:
                shutil.copy(path, data / split / c / path.name)
    return data


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported 2-block ViT (28 px, patch 14: 4 patch tokens) with random weights (seed 0):
    the model of the evaluation tests and the frozen backbone of the LiT tests."""
    import torch

    from dinosys.export import save_native
    from dinosys.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("vit_tiny", img_size=28, patch_size=14, embed_dim=32, depth=2,
                            num_heads=2, layerscale_init=None)
    out = tmp_path_factory.mktemp("tiny-export") / "model"
    save_native(model.eval(), out)
    return out
