"""``dinosys export`` and every end-of-run export: one path, :func:`export_model`.

Layout (written atomically): ``model.safetensors``, ``config.json`` (with ``model_type``),
``README.md`` (native, always written: ``dinosys.export.load`` reads them) and, per requested
format (the ``EXPORTERS`` registry, by model type; the backbone formats are registered here),
``timm/`` (timm layout + timm ``config.json``: ``timm.create_model('local-dir:DIR/timm',
pretrained=True)``), ``hf/`` (``Dinov2Model`` / ``Dinov2WithRegistersModel`` config + weights +
image-processor config: ``AutoModel.from_pretrained(DIR/hf)``), ``onnx/model.onnx`` (input
``pixel_values`` at the native size, dynamic batch; outputs ``cls_token``, ``patch_tokens``).
Each format, native included, is checked after writing by loading it exactly as the model card
tells a user to (``dinosys.export.load``, timm ``local-dir:``, ``AutoModel.from_pretrained``, an
onnxruntime session) and comparing with our model: the maximum absolute difference is reported
in the summary, and an export that differs by more than ``CHECK_TOLERANCE`` (relative to the
feature scale a check reports) fails.
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
from dinosys.export.native import FORMAT_NAMES, write_native
from dinosys.export.registry import EXPORTERS, Exporter, model_type_of, register_exporter

log = logging.getLogger(__name__)

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


def _scale(ref: dict) -> float:
    """The feature scale a backbone check's tolerance is relative to."""
    return 1.0 + max(float(ref["x_norm_clstoken"].abs().max()),
                     float(ref["x_norm_patchtokens"].abs().max()))


def write_timm(backbone: nn.Module, out: Path, config: dict, head: nn.Linear | None = None
               ) -> None:
    """``out/timm``: weights in timm's layout and a timm ``config.json``.

    The timm model the weights are converted into is itself built from the written config
    (``local-dir:``, not pretrained), so the file holds exactly the keys that a user's load
    expects, with or without LayerScale, registers or SwiGLU. With ``head`` (a linear map of
    the normalised class token, e.g. a CLIP image projection) timm's classifier head is that
    map (``num_classes`` = its outputs, a zero bias when it has none): ``model(x)`` applies it.
    """
    from dinosys.export.compat import import_timm

    try:
        timm = import_timm()
    except ImportError as exc:
        raise UserError("export format 'timm' needs timm (pip install 'dinosys[export]')") from exc
    name, args = convert.timm_model_spec(backbone.cfg)
    num_classes = 0 if head is None else head.out_features
    args["num_classes"] = num_classes
    size = backbone.cfg.img_size
    timm_cfg = {
        "architecture": name,
        "num_classes": num_classes,
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
            "num_classes": num_classes,
            "first_conv": "patch_embed.proj",
            "license": "apache-2.0",
        },
    }
    if head is not None:
        timm_cfg["pretrained_cfg"]["classifier"] = "head"
    sub = out / "timm"
    sub.mkdir()
    (sub / "config.json").write_text(json.dumps(timm_cfg, indent=2) + "\n")
    skeleton = timm.create_model(f"local-dir:{sub}", pretrained=False)
    if head is None:
        convert.load_into_timm(backbone.state_dict(), skeleton)
    else:
        state = convert.to_timm_state_dict(backbone.state_dict(), skeleton)
        state["head.weight"] = head.weight.detach().clone()
        state["head.bias"] = (head.bias.detach().clone() if head.bias is not None
                              else torch.zeros(head.out_features))
        convert.load_state_dict_strict(skeleton, state, "timm model")
    state = {k: v.detach().contiguous() for k, v in skeleton.state_dict().items()}
    save_file(state, str(sub / "model.safetensors"), metadata={"format": "pt"})


def check_timm(backbone: nn.Module, out: Path, config: dict) -> dict:
    """Load ``out/timm`` the way the model card says
    (``timm.create_model('local-dir:DIR/timm', pretrained=True)``) and compare features."""
    from dinosys.export.compat import import_timm

    sub = out / "timm"
    source = f"local-dir:{sub}"
    try:
        timm_model = import_timm().create_model(source, pretrained=True).eval()
    except RuntimeError as exc:  # a key mismatch: the export would not load for its users
        raise RuntimeError(f"the timm export does not load with create_model('{source}', "
                           f"pretrained=True): {exc}") from exc
    x, ref = _probe(backbone)
    with torch.no_grad():
        feats = timm_model.forward_features(x)
    return {"architecture": json.loads((sub / "config.json").read_text())["architecture"],
            "loaded_with": "timm.create_model('local-dir:DIR/timm', pretrained=True)",
            "scale": _scale(ref),
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


def write_hf(backbone: nn.Module, out: Path, config: dict) -> None:
    """``out/hf``: Dinov2(WithRegisters)Model config + 4.x-named weights + image processor."""
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


def check_hf(backbone: nn.Module, out: Path, config: dict) -> dict:
    """``AutoModel.from_pretrained(out/hf)`` and compare (unchecked without transformers)."""
    sub = out / "hf"
    architecture = json.loads((sub / "config.json").read_text())["architectures"][0]
    try:
        from dinosys.export.compat import import_transformers

        tf = import_transformers()
    except ImportError:
        log.warning("transformers not installed: hf export written but not checked")
        return {"architecture": architecture, "max_abs_diff": None}
    hf_model = tf.AutoModel.from_pretrained(str(sub)).eval()  # as the model card says
    x, ref = _probe(backbone)
    with torch.no_grad():
        hidden = hf_model(pixel_values=x).last_hidden_state
    r = backbone.num_register_tokens
    return {"architecture": architecture,
            "loaded_with": "transformers.AutoModel.from_pretrained(DIR/hf)", "scale": _scale(ref),
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


def write_onnx(backbone: nn.Module, out: Path, config: dict) -> None:
    """``out/onnx/model.onnx`` at the native image size (dynamic batch)."""
    sub = out / "onnx"
    sub.mkdir()
    model = copy.deepcopy(backbone).eval()
    model.set_attn_backend("math")  # plain matmul/softmax: exports on every opset and runtime
    x, _ = _probe(backbone)
    export_onnx(_OnnxFeatures(model), x, sub / "model.onnx", ["cls_token", "patch_tokens"])


def export_onnx(module: nn.Module, x: torch.Tensor, path: Path, outputs: list[str]) -> None:
    """Trace ``module`` on ``x`` into ``path``: input ``pixel_values``, the named outputs, all
    with a dynamic batch axis (opset ``ONNX_OPSET``)."""
    axes = {name: {0: "batch"} for name in ["pixel_values", *outputs]}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # shape-dependent Python branches are constant at the exported size: expected
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["pixel_values"], output_names=outputs,
                              dynamic_axes=axes)
    except ImportError as exc:
        raise UserError(f"export format 'onnx' needs the onnx package ({exc}); "
                        "pip install 'dinosys[export]'") from exc


def check_onnx(backbone: nn.Module, out: Path, config: dict) -> dict:
    """Run ``out/onnx/model.onnx`` with onnxruntime and compare (unchecked without it)."""
    path = out / "onnx" / "model.onnx"
    x, ref = _probe(backbone)
    result: dict = {"file": "onnx/model.onnx", "opset": ONNX_OPSET,
                    "input_size": list(x.shape[1:]), "max_abs_diff": None}
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime not installed: onnx export written but not checked")
        return result
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result["loaded_with"] = "onnxruntime.InferenceSession(DIR/onnx/model.onnx)"
    result["scale"] = _scale(ref)
    cls, patches = session.run(None, {"pixel_values": x.numpy()})
    result["max_abs_diff"] = max(_max_diff(torch.from_numpy(cls), ref["x_norm_clstoken"]),
                                 _max_diff(torch.from_numpy(patches), ref["x_norm_patchtokens"]))
    return result


for _exporter in (
        Exporter("timm", ("vit_backbone",), write_timm, check_timm),
        Exporter("hf", ("vit_backbone",), write_hf, check_hf),
        Exporter("onnx", ("vit_backbone",), write_onnx, check_onnx)):
    register_exporter(_exporter)


def check_native(model: nn.Module, out: Path) -> dict:
    """Load the native files with ``dinosys.export.load`` (as the model card says), whatever
    the model type, and compare every weight with the model's."""
    from dinosys.export.loading import load_exported

    loaded = load_exported(out).state_dict()
    ref = model.state_dict()
    if loaded.keys() != ref.keys():
        raise RuntimeError(f"export check failed: the native export loads with other weights "
                           f"({sorted(set(loaded) ^ set(ref))[:3]})")
    diff = max((_max_diff(loaded[k], v) for k, v in ref.items() if v.numel()), default=0.0)
    return {"loaded_with": "dinosys.export.load(DIR)", "max_abs_diff": diff}


def _enforce_checks(checks: dict[str, dict]) -> None:
    """Fail the export (nothing is written) when a format differs from the model."""
    for fmt, check in checks.items():
        diff = check.get("max_abs_diff")
        if diff is not None and not diff <= CHECK_TOLERANCE * check.get("scale", 1.0):
            raise RuntimeError(f"export check failed: the {fmt} export loaded as its model card "
                               f"says gives features that differ by {diff:.3g} from the model's")


def is_dinosys_export(path: Path) -> bool:
    """Whether ``path`` holds a dinosys export (its ``config.json`` says so), complete or not."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") in FORMAT_NAMES


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


def _resolve_formats(formats: list[str], model_type: str) -> list[str]:
    wanted = [f.strip().lower() for f in formats if f.strip()]
    known = ["native", *EXPORTERS]
    unknown = [f for f in wanted if f not in known]
    if unknown:
        raise UserError(f"unknown export format(s) {unknown}; choose from {known}")
    unsupported = [f for f in wanted if f != "native"
                   and model_type not in EXPORTERS[f].model_types]
    if unsupported:
        raise UserError(f"export format(s) {unsupported} do not support model type "
                        f"'{model_type}'")
    return ["native"] + [f for f in EXPORTERS if f in wanted]


def source_provenance(path: Path) -> dict | None:
    """The ``provenance`` chain in an exported directory's config.json (None without one)."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    chain = data.get("provenance") if isinstance(data, dict) else None
    return chain if isinstance(chain, dict) else None


def export_model(model: str | Path | nn.Module, out: Path, formats: list[str],
                 card: dict | None = None) -> dict:
    """Export a model (a path ``dinosys.export.load`` accepts, or a module) to ``out``: the
    native files always, plus each of ``formats`` its model type supports, each checked after
    writing. Returns a summary (paths, model type, parameter count, per-format checks)."""
    from dinosys.export.loading import load

    out = check_export_target(out)
    if not isinstance(model, nn.Module) and not (card or {}).get("provenance"):
        carried = source_provenance(Path(model))  # re-exporting keeps the chain
        if carried:
            card = {**(card or {}), "provenance": carried}
    model = model if isinstance(model, nn.Module) else load(model)
    model = model.eval().cpu()
    model_type = model_type_of(model)
    wanted = _resolve_formats(list(formats), model_type)
    checks: dict[str, dict] = {}
    with atomic_directory(out) as tmp:
        config = write_native(model, tmp, card, wanted)
        checks["native"] = check_native(model, tmp)
        for name in wanted[1:]:
            EXPORTERS[name].write(model, tmp, config)
            checks[name] = EXPORTERS[name].check(model, tmp, config)
        _enforce_checks(checks)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    log.info("exported a %s to %s (%s)", model_type, out, ", ".join(wanted))
    arch = config.get("architecture", {})
    return {"out": str(out), "formats": wanted, "model_type": model_type,
            "arch": arch.get("arch") if isinstance(arch, dict) else None,
            "num_parameters": config.get("num_parameters"), "files": files, "checks": checks}
