"""The provenance chain in an export (config.json + model card), `dinosys info`, and a
re-export keeping the chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinosys.cli import main
from dinosys.export import save_native
from dinosys.models import create_backbone

CHAIN = {
    "pipeline": {"name": "p", "dir": "/runs/p", "config_sha256": "c" * 64},
    "curation": {"manifest": "/runs/p/curate/shards/manifest.parquet",
                 "manifest_sha256": "a" * 64, "pool": 4300, "kept": 4000,
                 "removed_near_duplicates": 200, "removed_contamination": 100,
                 "removed_exact_duplicates": 0},
    "training": {"stage": "distill", "recipe": "mnist_demo_cpu", "run_dir": "/runs/p/distill",
                 "config_sha256": "b" * 64, "steps": 2000},
    "teacher": {"path": "/runs/p/pretrain/export/teacher", "sha256": "d" * 64},
    "evaluation": {"mnist/knn/top1_k20": 0.955},
}


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_backbone("vit_tiny", img_size=28, patch_size=14, embed_dim=32, depth=2,
                            num_heads=2, layerscale_init=None)
    return save_native(model.eval(), tmp_path / "student", {"name": "s", "provenance": CHAIN})


def test_export_info_and_reexport_carry_the_chain(exported: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    assert json.loads((exported / "config.json").read_text())["provenance"] == CHAIN
    card = (exported / "README.md").read_text()
    assert "## Provenance" in card and "a" * 64 in card and "kept 4000 of 4300" in card
    assert main(["info", str(exported)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    block, info = lines[:-1], json.loads(lines[-1])
    assert info["provenance"] == CHAIN and info["num_parameters"] > 0
    text = "\n".join(block)
    for part in ("removed 200 near-duplicates, 100 eval contamination", "distill mnist_demo_cpu",
                 "/runs/p/pretrain/export/teacher", "mnist/knn/top1_k20 = 0.9550"):
        assert part in text
    assert main(["info", str(exported), "--json"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    again = tmp_path / "again"
    assert main(["export", "--model", str(exported), "--out", str(again)]) == 0
    capsys.readouterr()
    assert json.loads((again / "config.json").read_text())["provenance"] == CHAIN


def test_info_without_chain_and_on_a_missing_model(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    model = create_backbone("vit_tiny", img_size=28, patch_size=14, embed_dim=32, depth=2,
                            num_heads=2, layerscale_init=None)
    plain = save_native(model.eval(), tmp_path / "plain")
    assert main(["info", str(plain)]) == 0
    assert "provenance: none recorded" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no exported model" in err
