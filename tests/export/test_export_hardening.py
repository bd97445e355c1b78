"""Exports load as their model card says, for every architecture variant; ``--out`` never
replaces what is not an export (issue 18, items 3 and 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinosys.errors import UserError
from dinosys.export import load, save_native
from dinosys.export.exporter import export_model

REPO = Path(__file__).resolve().parents[2]
TOL = dict(atol=1e-4, rtol=1e-4)

VARIANTS = {
    "no_layerscale": ("vit_tiny", dict(layerscale_init=None)),  # the demo model
    "layerscale": ("vit_tiny", {}),
    "registers": ("vit_tiny_reg", {}),
    "swiglu": ("vit_tiny", dict(ffn="swiglu", layerscale_init=None)),
}


@pytest.mark.parametrize("variant", [  # the demo model's variant in the default suite
    "no_layerscale", *(pytest.param(v, marks=pytest.mark.slow) for v in sorted(VARIANTS)
                       if v != "no_layerscale")])
def test_every_format_loads_as_the_model_card_says(variant, tmp_path, randomized, timm_module,
                                                   transformers_module) -> None:
    import onnxruntime as ort

    arch, kw = VARIANTS[variant]
    ours = randomized(arch, seed=3, **kw)
    out = tmp_path / "model"
    summary = export_model(ours, out, ["timm", "hf", "onnx"])
    assert set(summary["checks"]) == {"native", "timm", "hf", "onnx"}
    card = (out / "README.md").read_text()
    assert "timm.create_model('local-dir:THIS_DIR/timm', pretrained=True)" in card
    assert "AutoModel.from_pretrained('THIS_DIR/hf')" in card and "onnx/model.onnx" in card

    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = ours(x)
        native = load(out)(x)
        timm_model = timm_module.create_model(f"local-dir:{out / 'timm'}", pretrained=True)
        timm_feats = timm_model.eval().forward_features(x)
        hidden = transformers_module.AutoModel.from_pretrained(str(out / "hf")).eval()(
            pixel_values=x).last_hidden_state
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    cls, patches = session.run(None, {"pixel_values": x.numpy()})
    r = ours.num_register_tokens
    pairs = [(native["x_norm_clstoken"], native["x_norm_patchtokens"]),
             (timm_feats[:, 0], timm_feats[:, timm_model.num_prefix_tokens:]),
             (hidden[:, 0], hidden[:, 1 + r:]),
             (torch.from_numpy(cls), torch.from_numpy(patches))]
    for got_cls, got_patches in pairs:
        torch.testing.assert_close(got_cls, ref["x_norm_clstoken"], **TOL)
        torch.testing.assert_close(got_patches, ref["x_norm_patchtokens"], **TOL)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dinosys.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture()
def source(tmp_path, randomized) -> Path:
    return save_native(randomized("vit_tiny", seed=1), tmp_path / "source")


def test_export_refuses_a_run_directory_and_keeps_it(source, tmp_path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000010" / "COMPLETE").write_text("10\n")
    (run / "config.yaml").write_text("name: x\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _snapshot(run)
    res = _cli("export", "--model", str(source), "--out", str(run), cwd=tmp_path)
    err = res.stderr.strip()
    assert res.returncode == 2 and "\n" not in err and "not a dinosys export" in err, res.stderr
    assert _snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "source"]  # no temp folder


def test_export_refuses_the_current_directory_and_files(source, tmp_path) -> None:
    res = _cli("export", "--model", str(source), "--out", ".", cwd=source)
    assert res.returncode == 2 and "current directory" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(UserError, match="is a file"):
        export_model(source, tmp_path / "afile", ["native"])
    assert (tmp_path / "afile").read_text() == "keep me"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(UserError, match="not empty and is not a dinosys export"):
        export_model(source, other, ["native"])
    assert [p.name for p in other.iterdir()] == ["holiday.jpg"]


def test_export_replaces_an_earlier_export_or_fills_an_empty_folder(source, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    export_model(source, empty, ["native"])
    assert json.loads((empty / "config.json").read_text())["format"] == "dinosys-model"
    export_model(source, empty, ["native"])  # an earlier export is replaced
    assert (empty / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
