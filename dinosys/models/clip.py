"""CLIP models: an image tower and a causal text tower mapped into one embedding space.

Image towers:

- trained (CLIP / SigLIP from scratch): any dinosys ViT (S/B/L/g, registers) + a linear
  projection of the CLS token (``pool: cls``, the layout open_clip expresses as a timm tower with
  ``timm_pool: token, timm_proj: linear``), or of CLS ⊕ mean patch token (``pool: cls_mean``);
- locked (LiT / dino.txt): a frozen backbone loaded from a dinosys run, checkpoint or export
  (or any ``dinosys.export.load`` source), ``trainable_blocks`` new transformer blocks on top of
  its token stream (drop path 0.3 in dino.txt), a new final norm, embedding = CLS ⊕ mean of the
  patch tokens, then a linear projection.

The frozen backbone is *not a registered submodule* of the locked tower: it has no gradients,
never reaches the optimizer, FSDP or a checkpoint (``state_dict()`` holds only what trains), and
it stays in eval mode. It still follows ``.to()``/``.cuda()``/dtype casts. Exports write it
(``export_state_dict()``) so an exported model is self-contained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinosys.config import Section, check_choice, check_range
from dinosys.errors import UserError
from dinosys.losses.clip import LOGIT_SCALE_INIT
from dinosys.models.block import Block
from dinosys.models.layers import swiglu_hidden_dim
from dinosys.models.text import TextConfig, TextTransformer
from dinosys.models.vit import BackboneConfig, DinoVisionTransformer, backbone_from_config

LOCKED_PREFIX = "visual.locked."


@dataclass
class ImageTowerConfig(Section):
    """The image tower: a trained ViT (``locked: null``) or a frozen backbone (LiT)."""

    # architecture of a trained tower (ignored when ``locked`` is set: the backbone's own)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # a dinosys run / checkpoint / export whose backbone is frozen (LiT / dino.txt)
    locked: str | None = None
    trainable_blocks: int = 2  # new blocks on top of a locked backbone
    block_drop_path: float = 0.3  # drop path of those blocks (dino.txt)
    pool: str = "auto"  # cls | cls_mean; auto: cls for a trained tower, cls_mean for a locked one

    def validate(self) -> None:
        check_choice(self.pool, ("auto", "cls", "cls_mean"), "model.image.pool")
        check_range(self.trainable_blocks, "model.image.trainable_blocks", 0)
        check_range(self.block_drop_path, "model.image.block_drop_path", 0.0, 1.0)

    @property
    def resolved_pool(self) -> str:
        """The pooling in effect (``auto`` resolved)."""
        if self.pool != "auto":
            return self.pool
        return "cls_mean" if self.locked else "cls"


@dataclass
class ClipModelConfig(Section):
    """A CLIP model: shared embedding size, image tower, text tower, logit scale (and bias)."""

    embed_dim: int = 512  # shared image-text embedding size
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = LOGIT_SCALE_INIT  # initial logit scale (log of 1/temperature)
    init_logit_bias: float | None = None  # set for SigLIP (-10)

    def validate(self) -> None:
        check_range(self.embed_dim, "model.embed_dim", 1)


def _pool(cls_token: Tensor, patch_tokens: Tensor, pool: str) -> Tensor:
    if pool == "cls":
        return cls_token
    return torch.cat([cls_token, patch_tokens.mean(dim=1)], dim=-1)


class TrainedImageTower(nn.Module):
    """A ViT trained from scratch + a bias-free linear projection of its pooled tokens."""

    def __init__(self, backbone: DinoVisionTransformer, embed_dim: int, pool: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        width = backbone.embed_dim * (2 if pool == "cls_mean" else 1)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> (B, embed_dim), not normalised."""
        out = self.backbone(images)
        return self.proj(_pool(out["x_norm_clstoken"], out["x_norm_patchtokens"], self.pool))


class LockedImageTower(nn.Module):
    """A frozen backbone + trainable blocks, norm and projection (LiT / dino.txt)."""

    def __init__(self, backbone: DinoVisionTransformer, embed_dim: int, n_blocks: int,
                 drop_path: float, pool: str) -> None:
        super().__init__()
        backbone.requires_grad_(False)
        backbone.eval()
        self._locked = [backbone]  # a list: not registered, so not trained, sharded or saved
        self.pool = pool
        d = backbone.embed_dim
        cfg = backbone.cfg
        hidden = swiglu_hidden_dim(d) if cfg.ffn == "swiglu" else 4 * d
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.ffn, hidden, cfg.layerscale_init, drop_path,
                  cfg.attn_backend) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(d, eps=1e-6) if n_blocks else None
        width = d * (2 if pool == "cls_mean" else 1)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        with torch.no_grad():
            for m in self.blocks.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
            nn.init.normal_(self.proj.weight, std=width ** -0.5)

    @property
    def locked(self) -> DinoVisionTransformer:
        """The frozen backbone."""
        return self._locked[0]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self._locked[0] = self._locked[0]._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> LockedImageTower:
        """Train mode for the new blocks; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.locked.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> (B, embed_dim), not normalised."""
        backbone = self.locked
        # the frozen backbone keeps its own dtype (FSDP mixed precision casts only the
        # trainable parts); its output enters the trainable blocks in theirs
        with torch.no_grad():
            out = backbone(images.to(backbone.pos_embed.dtype))
        r = backbone.num_register_tokens
        dtype = self.proj.weight.dtype
        if self.blocks:
            x = out["x_prenorm"].detach().to(dtype)
            for blk in self.blocks:
                x = blk(x)
            x = self.norm(x)
            cls_token, patches = x[:, 0], x[:, 1 + r :]
        else:
            cls_token = out["x_norm_clstoken"].to(dtype)
            patches = out["x_norm_patchtokens"].to(dtype)
        return self.proj(_pool(cls_token, patches, self.pool))


class CLIPModel(nn.Module):
    """``encode_image``/``encode_text`` -> L2-normalised embeddings; ``logit_scale`` (log) and,
    for SigLIP, ``logit_bias`` are learned."""

    model_type = "clip"  # what an exported directory's config.json names

    def __init__(self, cfg: ClipModelConfig, locked_backbone: DinoVisionTransformer | None = None
                 ) -> None:
        super().__init__()
        self.cfg = cfg
        pool = cfg.image.resolved_pool
        if (locked_backbone is None) != (cfg.image.locked is None):
            raise UserError("model.image.locked names a frozen backbone: build the model with "
                            "build_clip_model (it loads it)")
        if locked_backbone is not None:
            self.visual: nn.Module = LockedImageTower(
                locked_backbone, cfg.embed_dim, cfg.image.trainable_blocks,
                cfg.image.block_drop_path, pool)
        else:
            self.visual = TrainedImageTower(backbone_from_config(cfg.image.backbone),
                                            cfg.embed_dim, pool)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        # shape (1,), not a scalar: FSDP2 shards no 0-d parameters (open_clip's
        # nonscalar_logit_scale; its checkpoint loader reshapes either way)
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))
                           if cfg.init_logit_bias is not None else None)

    @property
    def image_backbone(self) -> DinoVisionTransformer:
        """The ViT inside the image tower (frozen for LiT)."""
        visual = self.visual
        return visual.locked if isinstance(visual, LockedImageTower) else visual.backbone

    @property
    def image_size(self) -> int:
        """The image size the image tower was trained at (its position-embedding grid)."""
        return int(self.image_backbone.cfg.img_size)

    @property
    def is_locked(self) -> bool:
        """Whether the image backbone is frozen (LiT)."""
        return isinstance(self.visual, LockedImageTower)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Image embeddings (B, embed_dim)."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        """Text embeddings (B, embed_dim) of token ids (B, L)."""
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised (image, text) embeddings."""
        return self.encode_image(images), self.encode_text(tokens)

    def export_state_dict(self) -> dict[str, Tensor]:
        """Every weight, the frozen backbone included (under ``visual.locked.``): for exports."""
        state = dict(self.state_dict())
        if isinstance(self.visual, LockedImageTower):
            for k, v in self.visual.locked.state_dict().items():
                state[LOCKED_PREFIX + k] = v
        return state

    def load_export_state_dict(self, state: dict[str, Tensor], what: str = "model") -> None:
        """Load what :meth:`export_state_dict` gave (strict: every key, every shape)."""
        from dinosys.export.convert import load_state_dict_strict

        own = {k: v for k, v in state.items() if not k.startswith(LOCKED_PREFIX)}
        for name in ("logit_scale", "logit_bias"):  # 0-d in exports written before (1,)
            param = getattr(self, name)
            if name in own and param is not None and own[name].numel() == 1:
                own[name] = own[name].reshape(param.shape)
        locked = {k[len(LOCKED_PREFIX):]: v for k, v in state.items()
                  if k.startswith(LOCKED_PREFIX)}
        if isinstance(self.visual, LockedImageTower):
            load_state_dict_strict(self.visual.locked, locked, f"{what} (frozen backbone)")
        elif locked:
            raise UserError(f"cannot load {what}: it holds a frozen backbone "
                            f"({LOCKED_PREFIX}*) but the model has a trained image tower")
        load_state_dict_strict(self, own, what)

    def config_dict(self) -> dict:
        """The architecture as plain data; a locked backbone's own architecture is recorded."""
        data = asdict(self.cfg)
        data["image"]["backbone"] = asdict(self.image_backbone.cfg)
        data["image"]["pool"] = self.cfg.image.resolved_pool
        return data


def build_clip_model(cfg: ClipModelConfig) -> CLIPModel:
    """The model ``cfg`` describes; a locked backbone is loaded with ``dinosys.export.load``."""
    locked = None
    if cfg.image.locked:
        from dinosys.export import load

        try:
            locked = load(cfg.image.locked)
        except UserError as exc:
            raise UserError(f"config key 'model.image.locked': {exc}") from exc
        if not isinstance(locked, DinoVisionTransformer):
            raise UserError(f"model.image.locked={cfg.image.locked!r} is not a ViT backbone "
                            f"(got {type(locked).__name__})")
    return CLIPModel(cfg, locked)
