"""Exported directories: native load, timm / HF / ONNX loadable as-is, atomicity, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dinosys.cli import main as cli_main
from dinosys.errors import UserError
from dinosys.export import EXPORTERS, MODEL_TYPES, load, save_native
from dinosys.export.exporter import export_model

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny(randomized):
    return randomized("vit_tiny_reg", seed=5)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "model"
    card = {"name": "tiny test model", "data": "MNIST (embedded)",
            "evaluation": {"knn_top1": 0.9}}
    summary = export_model(tiny, out, ["native", "timm", "hf", "onnx"], card=card)
    return out, summary


def _ref(model, x):
    with torch.no_grad():
        return model(x)


def test_summary_and_files(exported):
    out, summary = exported
    assert summary["formats"] == ["native", "timm", "hf", "onnx"]
    for name in ("model.safetensors", "config.json", "README.md", "timm/model.safetensors",
                 "timm/config.json", "hf/config.json", "hf/model.safetensors",
                 "hf/preprocessor_config.json", "onnx/model.onnx"):
        assert (out / name).is_file(), name
    assert summary["checks"]["timm"]["max_abs_diff"] < 1e-5
    assert summary["checks"]["hf"]["max_abs_diff"] < 1e-5
    assert summary["checks"]["onnx"]["max_abs_diff"] < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["patch_size"] == 4 and config["num_register_tokens"] == 4
    assert config["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert config["architecture"]["embed_dim"] == 192
    readme = (out / "README.md").read_text()
    assert "tiny test model" in readme and "MNIST (embedded)" in readme
    assert "knn_top1" in readme and "local-dir:" in readme
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_native_load_is_identical(tiny, exported):
    out, _ = exported
    model = load(out)
    assert not model.training
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(_ref(model, x)["x_prenorm"], _ref(tiny, x)["x_prenorm"])
    # a run directory containing export/ loads the same model
    run = out.parent / "run"
    (run / "export").mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (run / "export" / name).write_bytes((out / name).read_bytes())
    torch.testing.assert_close(_ref(load(run), x)["x_prenorm"], _ref(tiny, x)["x_prenorm"])


def test_timm_folder_loads_with_timm(tiny, exported, timm_module):
    out, _ = exported
    model = timm_module.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 28, 28)
    ref = _ref(tiny, x)
    with torch.no_grad():
        feats = model.forward_features(x)
    torch.testing.assert_close(feats[:, 0], ref["x_norm_clstoken"], **TOL)
    torch.testing.assert_close(feats[:, 5:], ref["x_norm_patchtokens"], **TOL)


def test_hf_folder_loads_offline(tiny, exported, transformers_module):
    out, _ = exported
    model = transformers_module.AutoModel.from_pretrained(out / "hf", local_files_only=True).eval()
    assert type(model).__name__ == "Dinov2WithRegistersModel"
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state
    ref = _ref(tiny, x)
    torch.testing.assert_close(hidden[:, 0], ref["x_norm_clstoken"], **TOL)
    torch.testing.assert_close(hidden[:, 5:], ref["x_norm_patchtokens"], **TOL)
    processor = json.loads((out / "hf" / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 28, "width": 28}


def test_onnx_matches_torch_with_onnxruntime(tiny, exported):
    import onnxruntime as ort

    out, _ = exported
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 28, 28)  # another batch size than the exported example
    cls, patches = session.run(["cls_token", "patch_tokens"], {"pixel_values": x.numpy()})
    ref = _ref(tiny, x)
    torch.testing.assert_close(torch.from_numpy(cls), ref["x_norm_clstoken"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(patches), ref["x_norm_patchtokens"], atol=1e-4,
                               rtol=1e-4)


def test_failed_export_leaves_previous_directory_intact(tiny, tmp_path, monkeypatch):
    out = tmp_path / "model"
    save_native(tiny, out)
    before = (out / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setitem(EXPORTERS, "onnx", dataclasses.replace(EXPORTERS["onnx"], write=broken))
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(tiny, out, ["onnx"])
    assert (out / "model.safetensors").read_bytes() == before
    assert not (out / "onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_cli_export_from_an_exported_directory(tiny, tmp_path, capsys):
    src = save_native(tiny, tmp_path / "src")
    dst = tmp_path / "dst"
    assert cli_main(["export", "--model", str(src), "--out", str(dst), "--format", "native"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["formats"] == ["native"] and summary["num_parameters"] == 2692032
    assert (dst / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert cli_main(["export", "--model", str(tmp_path / "nope"), "--out", str(dst)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_inputs_are_user_errors(tiny, tmp_path):
    with pytest.raises(UserError, match="unknown export format"):
        export_model(tiny, tmp_path / "x", ["tflite"])
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an exported model"):
        load(tmp_path / "empty")
    good = save_native(tiny, tmp_path / "good")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((good / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read model weights"):
        load(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read model config"):
        load(broken)
    (broken / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="not a dinosys model config"):
        load(broken)
    # weights of another architecture: strict load names the keys
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    config = json.loads((good / "config.json").read_text())
    config["architecture"]["depth"] = 7
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="missing keys: blocks.6"):
        load(other)


def test_export_names_its_model_type_and_old_exports_still_load(tiny, tmp_path):
    out = save_native(tiny, tmp_path / "new")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vit_backbone" and config["format"] == "dinosys-model"
    # an export written before model types: format "dinosys-backbone", no model_type
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    legacy = {k: v for k, v in config.items() if k != "model_type"}
    legacy["format"], legacy["format_version"] = "dinosys-backbone", 1
    (old / "config.json").write_text(json.dumps(legacy))
    for path in (out, old):
        model = load(path)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     tiny.state_dict().values()))
    config["model_type"] = "no_such_type"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="model_type 'no_such_type'"):
        load(out)


def test_format_must_support_the_model_type(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(EXPORTERS, "onnx", dataclasses.replace(EXPORTERS["onnx"],
                                                               model_types=("another_type",)))
    with pytest.raises(UserError, match=r"\['onnx'\] do not support model type 'vit_backbone'"):
        export_model(tiny, tmp_path / "x", ["onnx"])
    assert set(EXPORTERS) >= {"timm", "hf", "onnx"} and "vit_backbone" in MODEL_TYPES
