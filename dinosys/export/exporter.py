"""``dinosys export``: a backbone to a directory other tools load as-is.

Layout (written atomically): ``model.safetensors``, ``config.json``, ``README.md`` (native,
always written: ``dinosys.export.load`` reads them) and, per requested format,
``timm/`` (timm layout + timm ``config.json``: ``timm.create_model('local-dir:DIR/timm',
pretrained=True)``), ``hf/`` (``Dinov2Model`` / ``Dinov2WithRegistersModel`` config + weights +
image-processor config: ``AutoModel.from_pretrained(DIR/hf)``), ``onnx/model.onnx`` (input
``pixel_values`` at the native size, dynamic batch; outputs ``cls_token``, ``patch_tokens``).
Each format is checked after writing against our model on one random image: the maximum
absolute feature difference is reported in the summary.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dinosys.atomic import atomic_directory
from dinosys.errors import UserError
from dinosys.export import convert
from dinosys.export.native import write_native

log = logging.getLogger(__name__)

FORMATS = ("native", "timm", "hf", "onnx")
ONNX_OPSET = 17


def _probe(backbone: nn.Module, batch: int = 2) -> tuple[torch.Tensor, dict]:
    size = backbone.cfg.img_size
    x = torch.randn(batch, backbone.cfg.in_chans, size, size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return x, backbone(x)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def export_timm(backbone: nn.Module, out: Path, config: dict) -> dict:
    """``out/timm``: weights in timm's layout and a timm ``config.json``; checked with timm."""
    try:
        timm_model = convert.create_timm_model(backbone.cfg).eval()
    except ImportError as exc:
        raise UserError("export format 'timm' needs timm (pip install 'dinosys[export]')") from exc
    convert.load_into_timm(backbone.state_dict(), timm_model)
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
    state = {k: v.detach().contiguous() for k, v in timm_model.state_dict().items()}
    save_file(state, str(sub / "model.safetensors"), metadata={"format": "pt"})
    (sub / "config.json").write_text(json.dumps(timm_cfg, indent=2) + "\n")
    x, ref = _probe(backbone)
    with torch.no_grad():
        feats = timm_model.forward_features(x)
    return {"architecture": name,
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
    hf_model = tf.AutoModel.from_pretrained(str(sub)).eval()
    x, ref = _probe(backbone)
    with torch.no_grad():
        hidden = hf_model(pixel_values=x).last_hidden_state
    r = backbone.num_register_tokens
    return {"architecture": hf_cfg["architectures"][0],
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
    cls, patches = session.run(None, {"pixel_values": x.numpy()})
    result["max_abs_diff"] = max(_max_diff(torch.from_numpy(cls), ref["x_norm_clstoken"]),
                                 _max_diff(torch.from_numpy(patches), ref["x_norm_patchtokens"]))
    return result


def _resolve_formats(formats: list[str]) -> list[str]:
    wanted = [f.strip().lower() for f in formats if f.strip()]
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    return ["native"] + [f for f in FORMATS[1:] if f in wanted]


def export_model(model: str | Path | nn.Module, out: Path, formats: list[str],
                 card: dict | None = None) -> dict:
    """Export a backbone (a path ``dinosys.export.load`` accepts, or a module) to ``out``.

    The native files are always written; ``formats`` adds timm, hf, onnx. Returns a summary
    (paths, parameter count, per-format check results).
    """
    from dinosys.export.loading import load

    wanted = _resolve_formats(list(formats))
    backbone = model if isinstance(model, nn.Module) else load(model)
    backbone = backbone.eval().cpu()
    out = Path(out)
    checks: dict[str, dict] = {}
    with atomic_directory(out) as tmp:
        config = write_native(backbone, tmp, card, wanted)
        if "timm" in wanted:
            checks["timm"] = export_timm(backbone, tmp, config)
        if "hf" in wanted:
            checks["hf"] = export_hf(backbone, tmp, config)
        if "onnx" in wanted:
            checks["onnx"] = export_onnx(backbone, tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    log.info("exported %s to %s (%s)", config["architecture"]["arch"], out, ", ".join(wanted))
    return {"out": str(out), "formats": wanted, "arch": config["architecture"]["arch"],
            "num_parameters": config["num_parameters"], "files": files, "checks": checks}
