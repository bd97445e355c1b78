"""The DINOv2 vision transformer (ViT-S/B/L/g with patch 14, and a tiny CPU size).

Parameter names are the released DINOv2 hub layout (``cls_token``, ``pos_embed``,
``register_tokens``, ``mask_token``, ``patch_embed.proj``, ``blocks.{i}...``, ``norm``), so a
state dict saved here loads into timm's ``vit_*_patch14[_reg4]_dinov2`` and converts to Hugging
Face ``Dinov2Model`` (see dinosys.export.convert).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinosys.errors import ConfigError, UserError
from dinosys.models.backbone_config import BackboneConfig
from dinosys.models.block import Block
from dinosys.models.flops import drop_path_rates
from dinosys.models.layers import LayerScale, PatchEmbed, swiglu_hidden_dim

# arch -> (embed_dim, depth, num_heads, patch_size, ffn)
ARCHS: dict[str, tuple[int, int, int, int, str]] = {
    "vit_tiny": (192, 6, 3, 4, "mlp"),
    "vits14": (384, 12, 6, 14, "mlp"),
    "vitb14": (768, 12, 12, 14, "mlp"),
    "vitl14": (1024, 24, 16, 14, "mlp"),
    "vitg14": (1536, 40, 24, 14, "swiglu"),
}
REGISTER_SUFFIX = "_reg"
DEFAULT_REGISTERS = 4
_BLOCK_NAME = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_LAYER0_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
RELEASED_INTERPOLATE_OFFSET = 0.1  # DINOv2's non-register models: scale_factor=(n + 0.1) / M
TINY_IMG_SIZE = 28  # vit_tiny's default pos-embed grid: 28x28 MNIST with patch 4 -> 7x7


def arch_names() -> list[str]:
    """Every accepted backbone name (with and without the register suffix)."""
    return [n + s for n in ARCHS for s in ("", REGISTER_SUFFIX)]


def resolve_config(cfg: BackboneConfig) -> BackboneConfig:
    """A copy of ``cfg`` with every arch-dependent ``None`` field filled in and checked."""
    base = cfg.arch[: -len(REGISTER_SUFFIX)] if cfg.arch.endswith(REGISTER_SUFFIX) else cfg.arch
    if base not in ARCHS:
        raise ConfigError(f"config key 'model.arch': unknown backbone {cfg.arch!r}; "
                          f"choose one of {arch_names()}")
    dim, depth, heads, patch, ffn = ARCHS[base]
    out = replace(
        cfg,
        embed_dim=cfg.embed_dim or dim,
        depth=cfg.depth or depth,
        num_heads=cfg.num_heads or heads,
        patch_size=cfg.patch_size or patch,
        ffn=cfg.ffn or ffn,
        num_registers=(cfg.num_registers if cfg.num_registers is not None
                       else DEFAULT_REGISTERS if cfg.arch.endswith(REGISTER_SUFFIX) else 0),
    )
    if out.interpolate_offset is None:
        out = replace(out, interpolate_offset=0.0 if out.num_registers else
                      RELEASED_INTERPOLATE_OFFSET)
    if out.embed_dim % out.num_heads:
        raise ConfigError(f"config key 'model.embed_dim': {out.embed_dim} is not divisible by "
                          f"model.num_heads={out.num_heads}")
    if out.img_size % out.patch_size:
        raise ConfigError(f"config key 'model.img_size': {out.img_size} is not a multiple of "
                          f"the patch size {out.patch_size}")
    if out.num_registers < 0 or out.depth < 1:
        raise ConfigError("config keys 'model.num_registers' >= 0 and 'model.depth' >= 1 required")
    return out


class DinoVisionTransformer(nn.Module):
    """ViT backbone; ``forward`` takes one image batch or a list of crops (see ``forward``)."""

    model_type = "vit_backbone"  # what an exported directory's config.json names

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        cfg = resolve_config(cfg)
        self.cfg = cfg
        self.embed_dim = d = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.num_heads = cfg.num_heads
        self.num_register_tokens = cfg.num_registers
        self.n_blocks = cfg.depth
        # released layouts: register models resize the pos-embed to an explicit size with
        # antialias, the others by scale_factor (n + offset) / M without (see resolve_config)
        self.interpolate_antialias = cfg.num_registers > 0
        self.interpolate_offset = cfg.interpolate_offset
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        grid = cfg.img_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.register_tokens = (nn.Parameter(torch.zeros(1, cfg.num_registers, d))
                                if cfg.num_registers else None)
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        rates = drop_path_rates(cfg)
        hidden = swiglu_hidden_dim(d) if cfg.ffn == "swiglu" else 4 * d
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.ffn, hidden, cfg.layerscale_init, rate, cfg.attn_backend)
            for rate in rates
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.pack_tokens = False  # enable_token_packing
        self.init_weights()

    # ------------------------------------------------------------------ initialisation
    def init_weights(self) -> None:
        """DINOv2 init: trunc-normal(0.02) linears and pos-embed, cls/registers N(0, 1e-6).

        Safe to call again after ``to_empty`` (meta-device construction).
        """
        with torch.no_grad():
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            if self.register_tokens is not None:
                nn.init.normal_(self.register_tokens, std=1e-6)
            self.mask_token.zero_()
            self.patch_embed.proj.reset_parameters()
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.LayerNorm, LayerScale)):
                    m.reset_parameters()

    # ------------------------------------------------------------------ layer groups
    @property
    def num_layers(self) -> int:
        """Layer groups for layer-wise lr decay: embeddings (0), each block, the final norm."""
        return self.n_blocks + 2

    def layer_id(self, name: str) -> int:
        """The layer group of parameter ``name``: 0 for the patch embedding, position embedding
        and tokens, i + 1 for ``blocks.i``, ``num_layers - 1`` for the rest (final norm)."""
        if any(key in name for key in _LAYER0_NAMES):
            return 0
        match = _BLOCK_NAME.search(name)
        if match:
            return int(match.group(1)) + 1
        return self.n_blocks + 1

    def set_attn_backend(self, backend: str) -> None:
        """Switch every block's attention backend (auto, sdpa, xformers, math)."""
        self.cfg = replace(self.cfg, attn_backend=backend)  # __post_init__ checks the name
        for blk in self.blocks:
            blk.attn.backend = backend

    # ------------------------------------------------------------------ tokens
    def interpolate_pos_encoding(self, h_patches: int, w_patches: int) -> Tensor:
        """Position embedding (1, 1 + h*w, D) for a grid of h x w patches (bicubic resize)."""
        pos = self.pos_embed
        n = pos.shape[1] - 1
        side = int(math.sqrt(n))
        if h_patches == side and w_patches == side:
            return pos
        patch_pos = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((h_patches + self.interpolate_offset) / side,
                     (w_patches + self.interpolate_offset) / side)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic",
                                      align_corners=False, antialias=self.interpolate_antialias)
        else:
            patch_pos = F.interpolate(patch_pos, size=(h_patches, w_patches), mode="bicubic",
                                      align_corners=False, antialias=self.interpolate_antialias)
        if patch_pos.shape[-2:] != (h_patches, w_patches):
            raise RuntimeError(f"pos-embed resized to {tuple(patch_pos.shape[-2:])}, expected "
                               f"{(h_patches, w_patches)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h_patches * w_patches, -1)
        return torch.cat([pos[:, :1], patch_pos.to(pos.dtype)], dim=1)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + R + N, D): mask, cls, pos-embed, registers."""
        if x.ndim != 4:
            raise UserError(f"backbone input must be (B, C, H, W); got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            if masks.shape != tokens.shape[:2] or masks.dtype != torch.bool:
                want = tuple(tokens.shape[:2])
                raise UserError(f"patch mask must be a bool tensor of shape {want}; "
                                f"got {masks.dtype} {tuple(masks.shape)}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        p = self.patch_size
        tokens = tokens + self.interpolate_pos_encoding(h // p, w // p).to(tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        return tokens

    def _outputs(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        r = self.num_register_tokens
        # LayerNorm acts per token, so normalising each part separately equals slicing the
        # normalised whole; it returns fresh tensors instead of views of one (FSDP2 warns about
        # views returned from a sharded module: an in-place op on one would skip its hook)
        return {
            "x_norm_clstoken": self.norm(x[:, 0]),
            "x_norm_regtokens": self.norm(x[:, 1 : r + 1]),
            "x_norm_patchtokens": self.norm(x[:, r + 1 :]),
            "x_prenorm": x,
            "masks": masks,
        }

    # ------------------------------------------------------------------ forward
    def forward_features_list(self, xs: Sequence[Tensor],
                              masks: Sequence[Tensor | None]) -> list[dict[str, Tensor | None]]:
        """Crops of several sizes at once: same-length token sequences share one group."""
        if len(masks) != len(xs):
            raise UserError(f"got {len(xs)} crops but {len(masks)} masks; pass one per crop")
        tokens = [self.prepare_tokens(x, m) for x, m in zip(xs, masks)]
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(tokens):
            groups.setdefault(t.shape[1], []).append(i)
        members = list(groups.values())
        hs = [torch.cat([tokens[i] for i in idx]) if len(idx) > 1 else tokens[idx[0]]
              for idx in members]
        if self.pack_tokens:
            layout = tuple((h.shape[0], h.shape[1]) for h in hs)
            x = torch.cat([h.reshape(-1, h.shape[-1]) for h in hs]) if len(hs) > 1 \
                else hs[0].reshape(-1, hs[0].shape[-1])
            for blk in self.blocks:
                x = blk(x, layout)
            hs = [part.view(b, n, -1) for part, (b, n) in zip(x.split([b * n for b, n in layout]),
                                                               layout)]
        else:
            for blk in self.blocks:
                hs = blk(hs)
        per_crop: list[Tensor] = [torch.empty(0)] * len(xs)
        for idx, h in zip(members, hs):
            if len(idx) == 1:
                per_crop[idx[0]] = h
                continue
            # copies, not views of the group's tensor: FSDP2 warns about views returned from a
            # sharded module (an in-place op on one would skip its pre-backward hook)
            for i, part in zip(idx, h.split([tokens[i].shape[0] for i in idx])):
                per_crop[i] = part.clone()
        return [self._outputs(h, m) for h, m in zip(per_crop, masks)]

    def forward(self, x: Tensor | Sequence[Tensor],
                masks: Tensor | Sequence[Tensor | None] | None = None) -> dict | list[dict]:
        """Backbone features.

        ``x`` a Tensor (B, C, H, W) -> dict; a list of crops (different sizes allowed) -> list
        of dicts, with ``masks`` None or a list (one (B, N) bool tensor or None per crop).
        Keys: x_norm_clstoken (B, D), x_norm_regtokens (B, R, D), x_norm_patchtokens (B, N, D),
        x_prenorm (B, 1 + R + N, D), masks.
        """
        if isinstance(x, Tensor):
            if masks is not None and not isinstance(masks, Tensor):
                raise UserError("a single image batch takes a single (B, N) mask tensor")
            return self.forward_features_list([x], [masks])[0]
        xs = list(x)
        if not xs:
            raise UserError("backbone got an empty list of crops")
        if masks is None:
            mask_list: list[Tensor | None] = [None] * len(xs)
        elif isinstance(masks, Tensor):
            raise UserError("a list of crops takes a list of masks (one tensor or None per crop)")
        else:
            mask_list = list(masks)
        return self.forward_features_list(xs, mask_list)

    def _block_outputs(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        indices = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else list(n)
        bad = [i for i in indices if not 0 <= i < self.n_blocks]
        if bad:
            raise UserError(f"block indices {bad} out of range for a {self.n_blocks}-block model")
        wanted, outs = set(indices), []
        h = self.prepare_tokens(x)
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if i in wanted:
                outs.append(h)
        return outs

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1,
                                reshape: bool = False, return_class_token: bool = False,
                                norm: bool = True) -> tuple:
        """Patch tokens of the last ``n`` blocks (or of the block indices in ``n``).

        Each output is (B, N, D), or (B, D, h, w) with ``reshape``; with
        ``return_class_token`` each output is a pair (patch tokens, class token (B, D)).
        """
        outs = self._block_outputs(x, n)
        if norm:
            outs = [self.norm(o) for o in outs]
        r = self.num_register_tokens
        cls = [o[:, 0] for o in outs]
        patches = [o[:, 1 + r :] for o in outs]
        if reshape:
            b, _, h, w = x.shape
            p = self.patch_size
            patches = [t.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous()
                       for t in patches]
        if return_class_token:
            return tuple(zip(patches, cls))
        return tuple(patches)

def backbone_from_config(cfg: BackboneConfig) -> DinoVisionTransformer:
    """Build the backbone described by ``cfg`` (arch defaults fill its None fields)."""
    return DinoVisionTransformer(cfg)


def create_backbone(name: str, **kw) -> DinoVisionTransformer:
    """Build a backbone by name (vit_tiny, vits14, vitb14, vitl14, vitg14, each +``_reg``).

    Keyword arguments override BackboneConfig fields (e.g. ``img_size=518``,
    ``drop_path_rate=0.4``, ``attn_backend="sdpa"``). ``vit_tiny`` defaults to a 28 px image
    with patch 4 (MNIST) unless ``img_size`` is given.
    """
    if name.removesuffix(REGISTER_SUFFIX) == "vit_tiny":
        kw.setdefault("img_size", TINY_IMG_SIZE)
    try:
        cfg = BackboneConfig(arch=name, **kw)
    except TypeError as exc:
        from dataclasses import fields

        known = [f.name for f in fields(BackboneConfig) if f.name != "arch"]
        raise ConfigError(f"create_backbone({name!r}): unknown option ({exc}); "
                          f"known options: {known}") from exc
    return backbone_from_config(cfg)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward (in place; parameter names unchanged)."""
    for blk in _blocks_of(model):
        blk.activation_checkpointing = True
    return model


# distinct block graphs one model may need: train/eval, with/without grad, per crop-size set and
# per stochastic-depth subset size; torch's default limit (8) would silently fall back to eager
RECOMPILE_LIMIT = 64


def enable_token_packing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run every crop group's tokens through the blocks as one packed (T, D) tensor (one
    matrix multiply per projection for all crops; attention stays per sequence)."""
    backbones = [m for m in model.modules() if isinstance(m, DinoVisionTransformer)]
    if not backbones:
        raise UserError(f"{type(model).__name__} has no DINOv2 backbone")
    for backbone in backbones:
        backbone.pack_tokens = enabled
    return model


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` every block in place (``nn.Module.compile``; state-dict keys unchanged).

    Static shapes by default (``dynamic=False``): the crop sizes and batch are fixed in
    training, so each block graph is compiled once per crop-size set and reused by every block
    and step (torch inlines the block modules, so the 40 blocks of ViT-g share one graph), with
    shape-specialised kernels instead of symbolic ones.
    """
    import torch._dynamo

    compile_kwargs.setdefault("dynamic", False)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name,
                    max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT))
    for blk in _blocks_of(model):
        blk.compile(**compile_kwargs)
    return model


def _blocks_of(model: nn.Module) -> list[Block]:
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise UserError(f"{type(model).__name__} has no transformer blocks")
    return blocks
