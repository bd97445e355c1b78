"""``dinosys export``: a backbone to a directory other tools load as-is.

Layout (written atomically): ``model.safetensors``, ``config.json``, ``README.md`` (native,
always written: ``dinosys.export.load`` reads them) and, per requested format,
``timm/`` (timm layout + timm ``config.json``: ``timm.create_model('local-dir:DIR/timm',
pretrained=True)``), ``hf/`` (``Dinov2Model`` / ``Dinov2WithRegistersModel`` config + weights +
image-processor config: ``AutoModel.from_pretrained(DIR/hf)``), ``onnx/model.onnx`` (input
``pixel_values`` at the native size, dynamic batch; outputs ``cls_token``, ``patch_tokens``).
Each format, native included, is checked after writing by loading it exactly as the model card
tells a user to (``dinosys.export.load``, timm ``local-dir:``, ``AutoModel.from_pretrained``, an
onnxruntime session) and comparing its features with our model's on random images: the maximum
absolute difference is reported in the summary, and an export whose features differ by more
than ``CHECK_TOLERANCE`` (relative to the feature scale) fails.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dinosys.atomic import atomic_directory
from dinosys.errors import UserError
from dinosys.export import convert
from dinosys.export.native import FORMAT_NAME, write_native

log = logging.getLogger(__name__)

FORMATS = ("native", "timm", "hf", "onnx")
ONNX_OPSET = 17
CHECK_TOLERANCE = 1e-3


def _probe(backbone: nn.Module, batch: int = 2) -> tuple[torch.Tensor, dict]:
    size = backbone.cfg.img_size
    x = torch.randn(batch, backbone.cfg.in_chans, size, size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return x, backbone(x)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def export_timm(backbone: nn.Module, out: Path, config: dict) -> dict:
    """``out/timm``: weights in timm's layout and a timm ``config.json``; checked by loading it
    the way the model card says (``timm.create_model('local-dir:DIR/timm', pretrained=True)``).

    The timm model the weights are converted into is itself built from the written config
    (``local-dir:``, not pretrained), so the file holds exactly the keys that a user's load
    expects, with or without LayerScale, registers or SwiGLU.
    """
    from dinosys.export.compat import import_timm

    try:
        timm = import_timm()
    except ImportError as exc:
        raise UserError("export format 'timm' needs timm (pip install 'dinosys[export]')") from exc
    name, args = convert.timm_model_spec(backbone.cfg)
    size = backbone.cfg.img_size
    timm_cfg = {
        "architecture": name,
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "global_pool": "token",
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [backbone.cfg.in_chans, size, size],
            "interpolation": "bicubic",
            "crop_pct": 224 / 256,
            "crop_mode": "center",
            "mean": config["normalization"]["mean"],
            "std": config["normalization"]["std"],
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "license": "apache-2.0",
        },
    }
    sub = out / "timm"
    sub.mkdir()
    (sub / "config.json").write_text(json.dumps(timm_cfg, indent=2) + "\n")
    source = f"local-dir:{sub}"
    skeleton = timm.create_model(source, pretrained=False)
    convert.load_into_timm(backbone.state_dict(), skeleton)
    state = {k: v.detach().contiguous() for k, v in skeleton.state_dict().items()}
    save_file(state, str(sub / "model.safetensors"), metadata={"format": "pt"})
    try:
        timm_model = timm.create_model(source, pretrained=True).eval()
    except RuntimeError as exc:  # a key mismatch: the export would not load for its users
        raise RuntimeError(f"the timm export does not load with create_model('{source}', "
                           f"pretrained=True): {exc}") from exc
    x, ref = _probe(backbone)
    with torch.no_grad():
        feats = timm_model.forward_features(x)
    return {"architecture": name, "loaded_with": "timm.create_model('local-dir:DIR/timm', "
            "pretrained=True)",
            "max_abs_diff": max(_max_diff(feats[:, 0], ref["x_norm_clstoken"]),
                                _max_diff(feats[:, timm_model.num_prefix_tokens:],
                                          ref["x_norm_patchtokens"]))}


def _hf_image_processor(backbone: nn.Module, config: dict) -> dict:
    size = backbone.cfg.img_size
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": config["preprocessing"]["resize_shorter_side"]},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": config["normalization"]["mean"],
        "image_std": config["normalization"]["std"],
        "do_convert_rgb": True,
    }


def export_hf(backbone: nn.Module, out: Path, config: dict) -> dict:
    """``out/hf``: Dinov2(WithRegisters)Model config + 4.x-named weights; checked if possible."""
    sub = out / "hf"
    sub.mkdir()
    state = convert.to_hf_state_dict(backbone.state_dict(), backbone.cfg)
    save_file({k: v.detach().contiguous() for k, v in state.items()},
              str(sub / "model.safetensors"), metadata={"format": "pt"})
    hf_cfg = convert.hf_config_dict(backbone.cfg)
    hf_cfg["torch_dtype"] = "float32"
    (sub / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    (sub / "preprocessor_config.json").write_text(
        json.dumps(_hf_image_processor(backbone, config), indent=2) + "\n")
    try:
        from dinosys.export.compat import import_transformers

        tf = import_transformers()
    except ImportError:
        log.warning("transformers not installed: hf export written but not checked")
        return {"architecture": hf_cfg["architectures"][0], "max_abs_diff": None}
    hf_model = tf.AutoModel.from_pretrained(str(sub)).eval()  # as the model card says
    x, ref = _probe(backbone)
    with torch.no_grad():
        hidden = hf_model(pixel_values=x).last_hidden_state
    r = backbone.num_register_tokens
    return {"architecture": hf_cfg["architectures"][0],
            "loaded_with": "transformers.AutoModel.from_pretrained(DIR/hf)",
            "max_abs_diff": max(_max_diff(hidden[:, 0], ref["x_norm_clstoken"]),
                                _max_diff(hidden[:, 1 + r:], ref["x_norm_patchtokens"]))}


class _OnnxFeatures(nn.Module):
    """(N, C, H, W) -> (cls token (N, D), patch tokens (N, P, D)) for ONNX export."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(pixel_values)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def export_onnx(backbone: nn.Module, out: Path) -> dict:
    """``out/onnx/model.onnx`` at the native image size (dynamic batch); checked with
    onnxruntime when installed."""
    sub = out / "onnx"
    sub.mkdir()
    model = copy.deepcopy(backbone).eval()
    model.set_attn_backend("math")  # plain matmul/softmax: exports on every opset and runtime
    wrapper = _OnnxFeatures(model)
    x, ref = _probe(backbone)
    path = sub / "model.onnx"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # shape-dependent Python branches are constant at the exported size: expected
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper, (x,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                input_names=["pixel_values"], output_names=["cls_token", "patch_tokens"],
                dynamic_axes={"pixel_values": {0: "batch"}, "cls_token": {0: "batch"},
                              "patch_tokens": {0: "batch"}},
            )
    except ImportError as exc:
        raise UserError(f"export format 'onnx' needs the onnx package ({exc}); "
                        "pip install 'dinosys[export]'") from exc
    result: dict = {"file": "onnx/model.onnx", "opset": ONNX_OPSET,
                    "input_size": list(x.shape[1:]), "max_abs_diff": None}
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime not installed: onnx export written but not checked")
        return result
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result["loaded_with"] = "onnxruntime.InferenceSession(DIR/onnx/model.onnx)"
    cls, patches = session.run(None, {"pixel_values": x.numpy()})
    result["max_abs_diff"] = max(_max_diff(torch.from_numpy(cls), ref["x_norm_clstoken"]),
                                 _max_diff(torch.from_numpy(patches), ref["x_norm_patchtokens"]))
    return result


def check_native(backbone: nn.Module, out: Path) -> dict:
    """Load the native files with ``dinosys.export.load`` (as the model card says) and compare."""
    from dinosys.export.loading import load_exported

    loaded = load_exported(out)
    x, ref = _probe(backbone)
    with torch.no_grad():
        got = loaded(x)
    return {"loaded_with": "dinosys.export.load(DIR)",
            "max_abs_diff": max(_max_diff(got["x_norm_clstoken"], ref["x_norm_clstoken"]),
                                _max_diff(got["x_norm_patchtokens"], ref["x_norm_patchtokens"]))}


def _enforce_checks(checks: dict[str, dict], backbone: nn.Module) -> None:
    """Fail the export (nothing is written) when a format's features differ from ours."""
    _, ref = _probe(backbone)
    scale = 1.0 + max(float(ref["x_norm_clstoken"].abs().max()),
                      float(ref["x_norm_patchtokens"].abs().max()))
    for fmt, check in checks.items():
        diff = check.get("max_abs_diff")
        if diff is not None and not diff <= CHECK_TOLERANCE * scale:
            raise RuntimeError(f"export check failed: the {fmt} export loaded as its model card "
                               f"says gives features that differ by {diff:.3g} from the model's")


def _resolve_formats(formats: list[str]) -> list[str]:
    wanted = [f.strip().lower() for f in formats if f.strip()]
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    return ["native"] + [f for f in FORMATS[1:] if f in wanted]


def is_dinosys_export(path: Path) -> bool:
    """Whether ``path`` holds a dinosys export (its ``config.json`` says so), complete or not."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def check_export_target(out: Path) -> Path:
    """``out`` as an absolute path if an export may be written there, else UserError.

    An export replaces its directory whole, so only a missing or empty directory or an earlier
    dinosys export may be named: never a run directory, a folder of other files, a file, or the
    current directory (or one holding it).
    """
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise UserError(f"export --out {out} is a file; name a directory")
    if out == Path.cwd() or out in Path.cwd().parents:
        raise UserError(f"export --out {out} is the current directory (or holds it); name a new "
                        "directory")
    if out.is_dir() and any(out.iterdir()) and not is_dinosys_export(out):
        raise UserError(f"export --out {out} is not empty and is not a dinosys export: refusing "
                        "to replace it (name a new or empty directory, e.g. RUN/export)")
    return out


def export_model(model: str | Path | nn.Module, out: Path, formats: list[str],
                 card: dict | None = None) -> dict:
    """Export a backbone (a path ``dinosys.export.load`` accepts, or a module) to ``out``.

    The native files are always written; ``formats`` adds timm, hf, onnx. Returns a summary
    (paths, parameter count, per-format check results).
    """
    from dinosys.export.loading import load

    wanted = _resolve_formats(list(formats))
    out = check_export_target(out)
    backbone = model if isinstance(model, nn.Module) else load(model)
    backbone = backbone.eval().cpu()
    checks: dict[str, dict] = {}
    with atomic_directory(out) as tmp:
        config = write_native(backbone, tmp, card, wanted)
        checks["native"] = check_native(backbone, tmp)
        if "timm" in wanted:
            checks["timm"] = export_timm(backbone, tmp, config)
        if "hf" in wanted:
            checks["hf"] = export_hf(backbone, tmp, config)
        if "onnx" in wanted:
            checks["onnx"] = export_onnx(backbone, tmp)
        _enforce_checks(checks, backbone)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    log.info("exported %s to %s (%s)", config["architecture"]["arch"], out, ", ".join(wanted))
    return {"out": str(out), "formats": wanted, "arch": config["architecture"]["arch"],
            "num_parameters": config["num_parameters"], "files": files, "checks": checks}
