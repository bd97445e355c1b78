"""The frozen distillation teacher: loaded from anything dinosys or DINOv2 users have.

Sources (``load_teacher(path)``):

- a dinosys run directory or checkpoint: the EMA teacher backbone **with its DINO/iBOT heads**
  (head distillation, the DINOv2 recipe), architecture and normalisation from the run's
  ``config.yaml``;
- a native export (``config.json`` + ``model.safetensors``): backbone only;
- a released DINOv2 backbone in timm layout (a directory with timm's ``config.json``, i.e.
  ``architecture`` + ``pretrained_cfg``, and ``model.safetensors``, as on the Hugging Face hub
  under ``timm/vit_*_patch14*_dinov2*`` or in our exports' ``timm/``);
- a released DINOv2 backbone in Hugging Face layout (``Dinov2Model`` /
  ``Dinov2WithRegistersModel``: ``config.json`` with ``model_type`` dinov2 + weights);
- a bare state-dict file (``.safetensors``, or ``.pth`` read with ``weights_only=True``) in the
  DINOv2 hub layout (``dinov2_vitl14_pretrain.pth``): ``arch`` names its architecture.

Backbone-only sources feed feature distillation. The teacher is frozen (no gradients), always
in eval mode (``train()`` is a no-op), in bf16 on GPU, and never part of a checkpoint: its
identity is recorded as path + a SHA-256 of its weights (``Teacher.fingerprint``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from dinosys.errors import ConfigError, UserError
from dinosys.models import DinoVisionTransformer, backbone_from_config
from dinosys.models.heads import DINOHead, HeadConfig, build_heads
from dinosys.models.vit import BackboneConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TIMM_SIZES = {"small": "vits14", "base": "vitb14", "large": "vitl14", "giant": "vitg14"}


@dataclass
class TeacherSource:
    """What a teacher path held: weights, architecture, heads and normalisation."""

    kind: str  # run, checkpoint, export, timm, hf, state_dict
    path: Path
    backbone_cfg: BackboneConfig
    backbone_state: dict[str, Tensor]
    head_cfg: HeadConfig | None = None
    head_states: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


class Teacher(nn.Module):
    """Frozen backbone (+ optional DINO / iBOT heads) that computes distillation targets.

    ``encode(global_crops)`` returns the final-norm cls (B, D) and patch tokens (B, N, D) and,
    with heads, the heads' L2-normalised bottlenecks of both (``cls_bottleneck`` (B, d),
    ``patch_bottleneck`` (B, N, d)); the prototype layers (``dino_last_layer`` /
    ``ibot_last_layer``) turn bottlenecks into logits where the targets are needed.
    """

    def __init__(self, source: TeacherSource) -> None:
        super().__init__()
        self.kind, self.path = source.kind, source.path
        self.mean, self.std = tuple(source.mean), tuple(source.std)
        self.backbone: DinoVisionTransformer = backbone_from_config(source.backbone_cfg)
        from dinosys.export.convert import load_state_dict_strict

        load_state_dict_strict(self.backbone, source.backbone_state,
                               f"teacher backbone {self.path}")
        self.head_cfg = source.head_cfg
        self.dino_head: DINOHead | None = None
        self.ibot_head: DINOHead | None = None
        if source.head_cfg is not None:
            dino, ibot = build_heads(source.head_cfg, self.backbone.embed_dim)
            load_state_dict_strict(dino, source.head_states["dino_head"],
                                   f"teacher DINO head {self.path}")
            self.dino_head = dino
            if ibot is dino:
                self.ibot_head = dino
            else:
                load_state_dict_strict(ibot, source.head_states["ibot_head"],
                                       f"teacher iBOT head {self.path}")
                self.ibot_head = ibot
        self.fingerprint = weights_sha256(self.state_dict())
        self.requires_grad_(False)
        super().train(False)

    @property
    def has_heads(self) -> bool:
        """Whether DINO/iBOT heads were loaded (head distillation possible)."""
        return self.dino_head is not None

    @property
    def embed_dim(self) -> int:
        """Width of the backbone tokens."""
        return self.backbone.embed_dim

    @property
    def patch_size(self) -> int:
        """Patch size of the backbone."""
        return self.backbone.patch_size

    def train(self, mode: bool = True) -> Teacher:
        """The teacher stays in eval mode whatever the caller asks."""
        del mode
        return super().train(False)

    def describe(self) -> dict[str, Any]:
        """Provenance for model cards and logs: path, source kind, weight hash, architecture."""
        cfg = self.backbone.cfg
        return {"path": str(self.path), "kind": self.kind, "sha256": self.fingerprint,
                "arch": cfg.arch, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
                "patch_size": cfg.patch_size, "heads": self.has_heads,
                "num_parameters": sum(p.numel() for p in self.backbone.parameters())}

    @torch.no_grad()
    def encode(self, images: Tensor) -> dict[str, Tensor]:
        """Targets for (B, C, H, W) images; see the class docstring."""
        dtype = next(self.backbone.parameters()).dtype
        out = self.backbone(images.to(dtype))
        res = {"cls": out["x_norm_clstoken"], "patches": out["x_norm_patchtokens"]}
        if self.dino_head is not None:
            res["cls_bottleneck"] = self.dino_head.bottleneck(res["cls"])
            res["patch_bottleneck"] = self.ibot_head.bottleneck(res["patches"])
        return res


def weights_sha256(state: dict[str, Tensor]) -> str:
    """SHA-256 over the sorted names, dtypes, shapes and bytes of a state dict."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------ loading


def load_teacher(path: str | Path, arch: str | None = None,
                 num_heads: int | None = None) -> Teacher:
    """The frozen teacher at ``path`` (see the module docstring), on CPU in fp32.

    ``arch`` (and ``num_heads`` when it is not the arch's) describe a bare weights file, whose
    tensors do not say how many attention heads there are.
    """
    return Teacher(read_teacher_source(Path(path), arch, num_heads))


def read_teacher_source(path: Path, arch: str | None = None,
                        num_heads: int | None = None) -> TeacherSource:
    """Identify what ``path`` holds and read its weights and configuration."""
    if not path.exists():
        raise UserError(f"teacher path {path} does not exist")
    if path.is_file():
        return _from_state_dict_file(path, arch, num_heads)
    config = path / "config.json"
    if config.is_file():
        data = _read_json(config)
        from dinosys.export.native import FORMAT_NAMES

        if data.get("format") in FORMAT_NAMES:
            return _from_export(path, data)
        if "architecture" in data and ("pretrained_cfg" in data or "model_args" in data):
            return _from_timm(path, data)
        if str(data.get("model_type", "")).startswith("dinov2"):
            return _from_hf(path, data)
        raise UserError(f"{config} is neither a dinosys export, a timm nor a Hugging Face "
                        "DINOv2 config")
    return _from_run(path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def _read_weights(path: Path) -> dict[str, Tensor]:
    """A state dict from a safetensors file or a torch file (tensors only, no code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors of many types
        raise UserError(f"cannot read teacher weights {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def _weights_file(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise UserError(f"{directory} has a config.json but no model.safetensors / pytorch_model.bin")


def _hub_backbone_cfg(state: dict[str, Tensor], arch: str,
                      num_heads: int | None) -> BackboneConfig:
    """The BackboneConfig of a DINOv2-hub-layout state dict (grid, registers, LayerScale)."""
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise UserError("teacher weights are not in the DINOv2 layout (no pos_embed / "
                        "patch_embed.proj.weight); use a timm or Hugging Face directory")
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    grid = int(round(math.sqrt(state["pos_embed"].shape[1] - 1)))
    regs = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
    has_ls = any(k.endswith("ls1.gamma") for k in state)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    try:
        return BackboneConfig(arch=arch, img_size=grid * patch, patch_size=patch,
                              num_registers=regs, depth=depth, num_heads=num_heads,
                              embed_dim=int(state["cls_token"].shape[-1]),
                              layerscale_init=1e-5 if has_ls else None)
    except ConfigError as exc:
        raise UserError(f"teacher.arch={arch!r}: {exc}") from exc


def _from_state_dict_file(path: Path, arch: str | None, num_heads: int | None) -> TeacherSource:
    if arch is None:
        raise UserError(f"teacher {path} is a bare weights file: set teacher.arch "
                        "(e.g. vitl14, vitg14_reg) to name its architecture")
    state = _read_weights(path)
    cfg = _hub_backbone_cfg(state, arch, num_heads)
    # timm-filtered hub weights drop the mask token: an unused zero one is equivalent
    state["mask_token"] = state.get("mask_token", torch.zeros(1, cfg.embed_dim)).reshape(1, -1)
    return TeacherSource("state_dict", path, cfg, state)


def _from_export(path: Path, data: dict) -> TeacherSource:
    from dinosys.export.loading import load_exported

    backbone = load_exported(path)
    norm = data.get("normalization") or {}
    return TeacherSource("export", path, backbone.cfg, backbone.state_dict(),
                         mean=tuple(norm.get("mean", IMAGENET_MEAN)),
                         std=tuple(norm.get("std", IMAGENET_STD)))


def _timm_arch(name: str) -> str:
    for size, arch in _TIMM_SIZES.items():
        if f"_{size}_" in name:
            return arch + ("_reg" if "_reg" in name else "")
    raise UserError(f"timm architecture {name!r} is not a DINOv2 ViT "
                    "(vit_{small,base,large,giant}_patch14[_reg4]_dinov2)")


def _from_timm(path: Path, data: dict) -> TeacherSource:
    from dinosys.export.convert import from_timm_state_dict

    name = str(data["architecture"])
    if "dinov2" not in name:
        raise UserError(f"{path}: timm architecture {name!r} is not a DINOv2 model")
    args = dict(data.get("model_args") or {})
    pre = data.get("pretrained_cfg") or {}
    img = int(args.get("img_size") or (pre.get("input_size") or [3, 518, 518])[-1])
    state = _read_weights(_weights_file(path))
    has_ls = any(k.endswith("ls1.gamma") for k in state)
    dim = int(state["cls_token"].shape[-1]) if "cls_token" in state else None
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    regs = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    cfg = BackboneConfig(arch=_timm_arch(name), img_size=img,
                         patch_size=int(args.get("patch_size", 14)), embed_dim=dim, depth=depth,
                         num_heads=args.get("num_heads"), num_registers=regs,
                         layerscale_init=1e-5 if has_ls else None)
    converted = from_timm_state_dict(state, cfg)
    return TeacherSource("timm", path, cfg, converted,
                         mean=tuple(pre.get("mean", IMAGENET_MEAN)),
                         std=tuple(pre.get("std", IMAGENET_STD)))


def _from_hf(path: Path, data: dict) -> TeacherSource:
    from dinosys.export.convert import config_from_hf, from_hf_state_dict

    cfg = config_from_hf(data)
    state = from_hf_state_dict(_read_weights(_weights_file(path)), cfg)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    proc = path / "preprocessor_config.json"
    if proc.is_file():
        pdata = _read_json(proc)
        mean = tuple(pdata.get("image_mean", mean))
        std = tuple(pdata.get("image_std", std))
    return TeacherSource("hf", path, cfg, state, mean=mean, std=std)


def _run_config(ckpt: Path) -> dict:
    """The run's config.yaml (two levels above ``RUN/checkpoints/<step>``) as plain data."""
    cfg_path = ckpt.resolve().parent.parent / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"teacher checkpoint {ckpt} has no run config at {cfg_path}")
    try:
        data = yaml.safe_load(cfg_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read teacher run config {cfg_path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _section(data: dict, schema: type, key: str) -> Any:
    from dataclasses import fields

    known = {f.name for f in fields(schema)}
    values = {k: v for k, v in (data.get(key) or {}).items() if k in known}
    try:
        return schema(**values)
    except (ConfigError, TypeError) as exc:
        raise UserError(f"teacher run config section '{key}' is invalid: {exc}") from exc


def _from_run(path: Path) -> TeacherSource:
    from dinosys.distributed.sharded_checkpoint import load_backbone_state, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(path)
    except UserError:
        from dinosys.export.loading import run_export_dir

        export = run_export_dir(path) if (path / "export").is_dir() else None
        if export is not None:  # RUN/export/<name>/ (RUN/export/ for older runs)
            return read_teacher_source(export)
        raise UserError(f"teacher {path} is not a run directory, checkpoint, export, timm or "
                        "Hugging Face model directory, nor a weights file") from None
    data = _run_config(ckpt)
    backbone_cfg = _section(data, BackboneConfig, "model")
    from dataclasses import replace

    backbone_cfg = replace(backbone_cfg, drop_path_rate=0.0, attn_backend="auto")
    backbone_state = load_backbone_state(ckpt, prefix="teacher.backbone")
    head_cfg = _section(data, HeadConfig, "heads")
    heads = {"dino_head": load_backbone_state(ckpt, prefix="teacher.dino_head")}
    if head_cfg.ibot_separate_head:
        heads["ibot_head"] = load_backbone_state(ckpt, prefix="teacher.ibot_head")
    crops = data.get("crops") or {}
    log.info("teacher: run checkpoint %s (backbone + heads)", ckpt)
    return TeacherSource("checkpoint", ckpt, backbone_cfg, backbone_state, head_cfg, heads,
                         mean=tuple(crops.get("mean", IMAGENET_MEAN)),
                         std=tuple(crops.get("std", IMAGENET_STD)))


def place_teacher(teacher: Teacher, device: torch.device, dtype: str = "auto") -> Teacher:
    """Move the teacher to ``device`` in its inference dtype (auto: bf16 on GPU, fp32 on CPU)."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    return teacher.to(device=device, dtype=torch_dtype)
