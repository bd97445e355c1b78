"""The image tower of a CLIP model as timm / Hugging Face / ONNX: the ``timm``, ``hf`` and
``onnx`` formats for model type ``clip``. Each gives the embedding ``encode_image`` gives, the
projection included, and is checked after writing like the backbone formats.

- ``onnx/model.onnx`` (any image tower, LiT included): ``encode_image``; input ``pixel_values``
  (N, 3, S, S) at the tower's size, output ``image_embeds`` (N, E), L2-normalised.
- ``timm/`` (a trained tower pooling the class token): the ViT with the projection as timm's
  classifier head (zero bias): ``F.normalize(model(x), dim=-1)`` is ``encode_image(x)``.
- ``hf/`` (a trained tower): the ViT as ``Dinov2Model`` (the backbone format) plus the
  projection in ``hf/image_projection.safetensors`` (``weight``, (E, width)) and its pooling in
  ``hf/image_projection.json``: embedding = normalize(pool(last_hidden_state) @ weight.T), pool
  ``cls``: ``last_hidden_state[:, 0]``; ``cls_mean``: that ⊕ the mean of the patch tokens
  ``last_hidden_state[:, 1 + registers:]``.

A LiT tower (new blocks on a locked backbone) is neither a timm nor a Hugging Face model, and
timm's heads pool one token: those exports say so in one line (``onnx`` expresses every tower).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dinosys.errors import UserError
from dinosys.export import exporter
from dinosys.export.registry import Exporter, register_exporter
from dinosys.models.attention import Attention
from dinosys.models.clip import CLIPModel, TrainedImageTower

log = logging.getLogger(__name__)

PROJECTION_WEIGHTS = "image_projection.safetensors"
PROJECTION_CONFIG = "image_projection.json"


def unsupported_reason(model: CLIPModel, fmt: str) -> str | None:
    """None if the ``fmt`` (timm / hf / onnx) export of ``model``'s image tower is exact;
    otherwise why not, in one line."""
    if fmt == "onnx":
        return None
    if not isinstance(model.visual, TrainedImageTower):
        return (f"{fmt} export of a clip model: a LiT image tower (trainable blocks on a locked "
                f"backbone) has no {fmt} form; the onnx format exports encode_image")
    if fmt == "timm" and model.visual.pool != "cls":
        return ("timm export of a clip model: timm's head pools one token, this tower pools "
                "cls ⊕ mean-patch; the hf format documents that pooling, onnx runs encode_image")
    return None


def _require(model: CLIPModel, fmt: str) -> TrainedImageTower:
    reason = unsupported_reason(model, fmt)
    if reason is not None:
        raise UserError(reason)
    return model.visual


def _probe(model: CLIPModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images at the tower's size and ``encode_image`` of them (normalised, raw)."""
    size = model.image_size
    x = torch.randn(2, model.image_backbone.cfg.in_chans, size, size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model.encode_image(x, normalize=False)
    return x, F.normalize(raw, dim=-1), raw


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------------------------ timm


def write_timm(model: nn.Module, out: Path, config: dict) -> None:
    """``out/timm``: the trained ViT with the projection as timm's head."""
    tower = _require(model, "timm")
    exporter.write_timm(tower.backbone, out, config, head=tower.proj)


def check_timm(model: nn.Module, out: Path, config: dict) -> dict[str, Any]:
    """Load ``out/timm`` as the model card says and compare ``model(x)`` with the projection."""
    from dinosys.export.compat import import_timm

    source = f"local-dir:{out / 'timm'}"
    timm_model = import_timm().create_model(source, pretrained=True).eval()
    x, ref, raw = _probe(model)
    with torch.no_grad():
        y = timm_model(x)
    return {"loaded_with": "timm.create_model('local-dir:DIR/timm', pretrained=True)",
            "output": "model(x) = the projection (normalise for the embedding)",
            "max_abs_diff": max(_diff(y, raw), _diff(F.normalize(y, dim=-1), ref))}


# ------------------------------------------------------------------------------ Hugging Face


def write_hf(model: nn.Module, out: Path, config: dict) -> None:
    """``out/hf``: the ViT as the backbone format writes it + the projection and its pooling."""
    tower = _require(model, "hf")
    exporter.write_hf(tower.backbone, out, config)
    save_file({"weight": tower.proj.weight.detach().contiguous()},
              str(out / "hf" / PROJECTION_WEIGHTS), metadata={"format": "pt"})
    spec = {"pool": tower.pool, "num_register_tokens": tower.backbone.num_register_tokens,
            "embed_dim": tower.proj.out_features, "normalize": True,
            "formula": "normalize(pool(last_hidden_state) @ weight.T); pool cls: "
                       "last_hidden_state[:, 0]; cls_mean: cat(last_hidden_state[:, 0], "
                       "last_hidden_state[:, 1 + num_register_tokens:].mean(1))"}
    (out / "hf" / PROJECTION_CONFIG).write_text(json.dumps(spec, indent=2) + "\n")


def hf_image_embeds(hf_model: nn.Module, folder: Path, pixel_values: torch.Tensor
                    ) -> torch.Tensor:
    """The image embedding from a ``hf/`` folder, computed as its ``image_projection.json``
    says (what the model card tells a user to do)."""
    spec = json.loads((folder / PROJECTION_CONFIG).read_text())
    weight = load_file(str(folder / PROJECTION_WEIGHTS))["weight"]
    hidden = hf_model(pixel_values=pixel_values).last_hidden_state
    pooled = hidden[:, 0]
    if spec["pool"] == "cls_mean":
        patches = hidden[:, 1 + spec["num_register_tokens"]:]
        pooled = torch.cat([pooled, patches.mean(dim=1)], dim=-1)
    return F.normalize(pooled @ weight.T, dim=-1)


def check_hf(model: nn.Module, out: Path, config: dict) -> dict[str, Any]:
    """``AutoModel.from_pretrained(out/hf)`` + the documented projection vs ``encode_image``
    (unchecked without transformers)."""
    folder = out / "hf"
    try:
        from dinosys.export.compat import import_transformers

        tf = import_transformers()
    except ImportError:
        log.warning("transformers not installed: hf export written but not checked")
        return {"max_abs_diff": None}
    hf_model = tf.AutoModel.from_pretrained(str(folder)).eval()
    x, ref, _ = _probe(model)
    with torch.no_grad():
        emb = hf_image_embeds(hf_model, folder, x)
    return {"loaded_with": "transformers.AutoModel.from_pretrained(DIR/hf) + "
                           f"{PROJECTION_WEIGHTS} as {PROJECTION_CONFIG} says",
            "max_abs_diff": _diff(emb, ref)}


# ------------------------------------------------------------------------------------ ONNX


class _EncodeImage(nn.Module):
    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


def write_onnx(model: nn.Module, out: Path, config: dict) -> None:
    """``out/onnx/model.onnx``: ``encode_image`` at the tower's size (dynamic batch)."""
    sub = out / "onnx"
    sub.mkdir()
    clone = copy.deepcopy(model).eval()  # the frozen backbone of a LiT tower comes along
    for module in [*clone.visual.modules(), *clone.image_backbone.modules()]:
        if isinstance(module, Attention):
            module.backend = "math"  # plain matmul/softmax: every opset and runtime
    x, _, _ = _probe(model)
    exporter.export_onnx(_EncodeImage(clone), x, sub / "model.onnx", ["image_embeds"])


def check_onnx(model: nn.Module, out: Path, config: dict) -> dict[str, Any]:
    """Run ``out/onnx/model.onnx`` with onnxruntime vs ``encode_image`` (unchecked without
    onnxruntime)."""
    x, ref, _ = _probe(model)
    result: dict[str, Any] = {"file": "onnx/model.onnx", "opset": exporter.ONNX_OPSET,
                              "input_size": list(x.shape[1:]), "output": "image_embeds",
                              "max_abs_diff": None}
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime not installed: onnx export written but not checked")
        return result
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (emb,) = session.run(None, {"pixel_values": x.numpy()})
    result["loaded_with"] = "onnxruntime.InferenceSession(DIR/onnx/model.onnx)"
    result["max_abs_diff"] = _diff(torch.from_numpy(emb), ref)
    return result


for _exporter in (Exporter("timm", ("clip",), write_timm, check_timm),
                  Exporter("hf", ("clip",), write_hf, check_hf),
                  Exporter("onnx", ("clip",), write_onnx, check_onnx)):
    register_exporter(_exporter)
