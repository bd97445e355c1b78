"""Weight conversion between our (= released DINOv2 hub) layout, timm and Hugging Face.

- timm: ``vit_*_patch14[_reg4]_dinov2`` take our layout through timm's own
  ``checkpoint_filter_fn`` (drops mask_token, moves registers, renames w12/w3 -> fc1/fc2).
- Hugging Face: ``Dinov2Model`` / ``Dinov2WithRegistersModel`` in the transformers 4.x key
  names (``attention.attention.{query,key,value}``, ``mlp.weights_in``), which transformers 5
  converts on ``from_pretrained``. HF -> ours accepts both the 4.x and the 5.x names.

Every load is strict: missing, unexpected or mis-shaped keys raise UserError naming them.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from dinosys.errors import UserError
from dinosys.models.layers import swiglu_hidden_dim
from dinosys.models.vit import ARCHS, REGISTER_SUFFIX, BackboneConfig, resolve_config

StateDict = dict[str, Tensor]

TIMM_ARCH = {"vits14": "vit_small_patch14", "vitb14": "vit_base_patch14",
             "vitl14": "vit_large_patch14", "vitg14": "vit_giant_patch14"}


def _short(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(module: nn.Module, state: StateDict, what: str = "model") -> None:
    """Load ``state`` into ``module``; any missing/unexpected/mis-shaped key is a UserError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_short(shapes)}")
        raise UserError(f"cannot load {what}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------ timm


def timm_model_spec(cfg: BackboneConfig) -> tuple[str, dict]:
    """The timm architecture name and the ``model_args`` that rebuild ``cfg`` in timm."""
    cfg = resolve_config(cfg)
    base = cfg.arch.removesuffix(REGISTER_SUFFIX)
    if cfg.ffn == "swiglu":
        name = "vit_giant_patch14"
        hidden = swiglu_hidden_dim(cfg.embed_dim)
        # timm's SwiGLUPacked width is int(dim * mlp_ratio) = 2 * hidden
        mlp_ratio = (2 * hidden + 0.5) / cfg.embed_dim
    else:
        name = TIMM_ARCH.get(base, "vit_small_patch14")
        mlp_ratio = 4.0
    name += "_reg4_dinov2" if cfg.num_registers else "_dinov2"
    args = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                mlp_ratio=mlp_ratio, init_values=cfg.layerscale_init, num_classes=0)
    if cfg.num_registers:
        args.update(reg_tokens=cfg.num_registers, no_embed_class=True)
    return name, args


def create_timm_model(cfg: BackboneConfig) -> nn.Module:
    """A randomly initialised timm VisionTransformer with the architecture of ``cfg``."""
    from dinosys.export.compat import import_timm

    timm = import_timm()
    name, args = timm_model_spec(cfg)
    return timm.create_model(name, pretrained=False, **args)


def to_timm_state_dict(state: StateDict, timm_model: nn.Module) -> StateDict:
    """Our state dict in timm's layout, through timm's own DINOv2 checkpoint filter."""
    from dinosys.export.compat import import_timm

    import_timm()
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = {k: v.clone() for k, v in state.items()}
    if not any(".ls1.gamma" in k for k in state):
        # no LayerScale here, but timm's DINOv2 ViTs always build it: identity gammas
        for k, v in timm_model.state_dict().items():
            if re.fullmatch(r"blocks\.\d+\.ls[12]\.gamma", k):
                state[k] = torch.ones_like(v)
    return checkpoint_filter_fn(state, timm_model)


def load_into_timm(state: StateDict, timm_model: nn.Module) -> nn.Module:
    """Load our state dict into a timm DINOv2 ViT, strictly."""
    load_state_dict_strict(timm_model, to_timm_state_dict(state, timm_model), "timm model")
    return timm_model


def from_timm_state_dict(state: StateDict, cfg: BackboneConfig) -> StateDict:
    """A timm DINOv2 ViT state dict back in our layout (mask token zero: timm has none)."""
    cfg = resolve_config(cfg)
    out: StateDict = {}
    for k, v in state.items():
        if k.startswith("head."):
            continue
        if cfg.layerscale_init is None and re.fullmatch(r"blocks\.\d+\.ls[12]\.gamma", k):
            if not torch.all(v == 1):
                raise UserError(f"timm weights have a LayerScale ({k}) but the model has none")
            continue
        if cfg.ffn == "swiglu":
            k = re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", k)
            k = re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", k)
        out[k] = v
    if "reg_token" in out:  # no_embed_class: cls carries its position, pos_embed has no cls slot
        out["register_tokens"] = out.pop("reg_token")
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    out.setdefault("mask_token", torch.zeros(1, cfg.embed_dim))
    return out


# ------------------------------------------------------------------------------ Hugging Face


def hf_config_dict(cfg: BackboneConfig) -> dict:
    """``config.json`` content of the equivalent HF Dinov2(WithRegisters)Model."""
    cfg = resolve_config(cfg)
    out = {
        "architectures": ["Dinov2WithRegistersModel" if cfg.num_registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if cfg.num_registers else "dinov2",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": 4,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": True,
        "layerscale_value": cfg.layerscale_init if cfg.layerscale_init else 1.0,
        "use_swiglu_ffn": cfg.ffn == "swiglu",
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
    }
    if cfg.num_registers:
        out["num_register_tokens"] = cfg.num_registers
    return out


def to_hf_state_dict(state: StateDict, cfg: BackboneConfig) -> StateDict:
    """Our state dict in HF Dinov2 4.x key names (loadable by transformers 4 and 5)."""
    cfg = resolve_config(cfg)
    d = cfg.embed_dim
    out: StateDict = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state["mask_token"].reshape(1, d),
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if cfg.num_registers:
        out["embeddings.register_tokens"] = state["register_tokens"]
    for i in range(cfg.depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{dst}attention.attention.query.{kind}"] = q
            out[f"{dst}attention.attention.key.{kind}"] = k
            out[f"{dst}attention.attention.value.{kind}"] = v
            out[f"{dst}attention.output.dense.{kind}"] = state[f"{src}attn.proj.{kind}"]
            out[f"{dst}norm1.{kind}"] = state[f"{src}norm1.{kind}"]
            out[f"{dst}norm2.{kind}"] = state[f"{src}norm2.{kind}"]
            if cfg.ffn == "swiglu":
                out[f"{dst}mlp.weights_in.{kind}"] = state[f"{src}mlp.w12.{kind}"]
                out[f"{dst}mlp.weights_out.{kind}"] = state[f"{src}mlp.w3.{kind}"]
            else:
                out[f"{dst}mlp.fc1.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
                out[f"{dst}mlp.fc2.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
        for n in (1, 2):
            gamma = state.get(f"{src}ls{n}.gamma")
            out[f"{dst}layer_scale{n}.lambda1"] = gamma if gamma is not None else torch.ones(d)
    return {k: v.contiguous() for k, v in out.items()}


_HF_BLOCK_RENAMES = [  # (HF suffix regex, our suffix); 4.x and 5.x names
    (r"attention\.output\.dense\.", "attn.proj."),
    (r"attention\.o_proj\.", "attn.proj."),
    (r"layer_scale(\d)\.lambda1", r"ls\1.gamma"),
    (r"mlp\.weights_in\.", "mlp.w12."),
    (r"mlp\.weights_out\.", "mlp.w3."),
    (r"mlp\.down_proj\.", "mlp.w3."),
]
_HF_QKV = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}


def config_from_hf(hf_cfg) -> BackboneConfig:  # type: ignore[no-untyped-def]
    """The BackboneConfig of an HF Dinov2(WithRegisters)Config (object or dict)."""
    get = hf_cfg.get if isinstance(hf_cfg, dict) else lambda k, default=None: getattr(
        hf_cfg, k, default)
    dim, depth, heads = get("hidden_size"), get("num_hidden_layers"), get("num_attention_heads")
    ffn = "swiglu" if get("use_swiglu_ffn", False) else "mlp"
    if get("mlp_ratio", 4) != 4:
        raise UserError(f"HF Dinov2 config with mlp_ratio={get('mlp_ratio')} is not supported (4)")
    regs = int(get("num_register_tokens", 0) or 0)
    patch = get("patch_size")
    patch = patch if isinstance(patch, int) else patch[0]
    image = get("image_size")
    image = image if isinstance(image, int) else image[0]
    arch = next((n for n, a in ARCHS.items() if a == (dim, depth, heads, patch, ffn)), "vit_tiny")
    return BackboneConfig(arch=arch + (REGISTER_SUFFIX if regs else ""), img_size=image,
                          patch_size=patch, in_chans=get("num_channels", 3), embed_dim=dim,
                          depth=depth, num_heads=heads, ffn=ffn, num_registers=regs,
                          layerscale_init=get("layerscale_value", 1.0))


def from_hf_state_dict(state: StateDict, cfg: BackboneConfig) -> StateDict:
    """An HF Dinov2 state dict (4.x or 5.x names, optional ``dinov2.`` prefix) in our layout."""
    cfg = resolve_config(cfg)
    state = {re.sub(r"^(dinov2|dinov2_with_registers)\.", "", k): v for k, v in state.items()}
    out: StateDict = {}
    qkv: dict[tuple[int, str], list[Tensor | None]] = {}
    gate_up: dict[tuple[int, str], list[Tensor | None]] = {}
    top = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.position_embeddings": "pos_embed",
           "embeddings.register_tokens": "register_tokens",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    for key, v in state.items():
        if key in top:
            out[top[key]] = v
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", key)
        if m is None:
            out[key] = v  # unknown: reported by the strict load
            continue
        i, rest = int(m.group(1)), m.group(2)
        a = re.match(r"attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\."
                     r"(weight|bias)$", rest)
        g = re.match(r"mlp\.(gate_proj|up_proj)\.(weight|bias)$", rest)
        if a:
            qkv.setdefault((i, a.group(2)), [None] * 3)[_HF_QKV[a.group(1)]] = v
        elif g:
            gate_up.setdefault((i, g.group(2)), [None] * 2)[g.group(1) == "up_proj"] = v
        else:
            for pattern, repl in _HF_BLOCK_RENAMES:
                rest = re.sub(pattern, repl, rest)
            out[f"blocks.{i}.{rest}"] = v
    for groups, name in ((qkv, "attn.qkv"), (gate_up, "mlp.w12")):
        for (i, kind), parts in groups.items():
            if any(p is None for p in parts):
                raise UserError(f"HF state dict: layer {i} has an incomplete {name} {kind}")
            out[f"blocks.{i}.{name}.{kind}"] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    if cfg.layerscale_init is None:
        raise UserError("HF Dinov2 models always have LayerScale; use layerscale_init != None")
    if "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(1, cfg.embed_dim)
    return out
