"""DINO / iBOT projection heads: MLP -> L2-normalised bottleneck -> prototype scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinosys.config import Section, check_bounds, check_choice

LAST_LAYER_KINDS = ("weight_norm", "linear")


@dataclass
class HeadConfig(Section):
    """DINO and iBOT projection heads."""

    n_prototypes: int = 65536  # DINO head output size (prototypes)
    hidden_dim: int = 2048  # DINO head MLP hidden size
    bottleneck_dim: int = 256  # DINO head bottleneck before the prototypes
    nlayers: int = 3  # DINO head MLP layers
    last_layer: str = "weight_norm"  # weight_norm or linear
    ibot_separate_head: bool = False  # iBOT uses its own head (else the DINO head)
    ibot_n_prototypes: int = 65536  # iBOT head prototypes (separate head)
    ibot_hidden_dim: int = 2048  # iBOT head MLP hidden size (separate head)
    ibot_bottleneck_dim: int = 256  # iBOT head bottleneck (separate head)

    def validate(self) -> None:
        check_choice(self.last_layer, ("weight_norm", "linear"), "heads.last_layer")
        check_bounds(self, "heads", {name: (1, None) for name in (
            "n_prototypes", "hidden_dim", "bottleneck_dim", "nlayers", "ibot_n_prototypes",
            "ibot_hidden_dim", "ibot_bottleneck_dim")})


class WeightNormLinear(nn.Module):
    """Bias-free linear layer whose weight rows are L2-normalised on every forward.

    This is `weight_norm(nn.Linear(in, out, bias=False))` with the gain g fixed to 1 (DINO's
    `norm_last_layer`): each prototype is a unit vector and the logits are cosine similarities
    with the (unit) bottleneck feature. The normalisation is written out in `forward` instead
    of using a parametrisation so that the single `weight` parameter shards cleanly under
    FSDP2 (the rows are normalised after the all-gather, on the full tensor).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init (DINOv2 builds the last layer after its trunc-normal pass)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def normalized_weight(self) -> Tensor:
        """The (out, in) weight with unit-norm rows."""
        eps = 1e-6 if self.weight.dtype == torch.float16 else 1e-12
        return F.normalize(self.weight, dim=1, p=2, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


def _build_mlp(nlayers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int) -> nn.Sequential:
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINOv2 projection head.

    `Linear(D,h)-GELU-[Linear(h,h)-GELU]*(nlayers-2)-Linear(h,bottleneck)`, L2-normalise, then a
    bias-free `last_layer` to `n_prototypes` logits (weight-normalised rows, or a plain linear
    layer). MLP weights are trunc-normal(0.02) with zero biases. The trainer freezes
    `last_layer`'s parameters during the first epoch.
    """

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        last_layer: str = "weight_norm",
    ) -> None:
        super().__init__()
        if last_layer not in LAST_LAYER_KINDS:
            raise ValueError(f"last_layer must be one of {LAST_LAYER_KINDS}, got {last_layer!r}")
        for name, value in (
            ("in_dim", in_dim),
            ("n_prototypes", n_prototypes),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("nlayers", nlayers),
        ):
            if int(value) < 1:
                raise ValueError(f"DINOHead {name} must be >= 1, got {value}")
        self.in_dim = in_dim
        self.n_prototypes = n_prototypes
        self.bottleneck_dim = bottleneck_dim
        self.mlp = _build_mlp(nlayers, in_dim, hidden_dim, bottleneck_dim)
        self.mlp.apply(_init_linear)
        self.last_layer: nn.Module
        if last_layer == "weight_norm":
            self.last_layer = WeightNormLinear(bottleneck_dim, n_prototypes)
        else:
            self.last_layer = nn.Linear(bottleneck_dim, n_prototypes, bias=False)

    def bottleneck(self, x: Tensor) -> Tensor:
        """The L2-normalised bottleneck feature (..., bottleneck_dim)."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) features -> (..., n_prototypes) logits."""
        return self.last_layer(self.bottleneck(x))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_heads(cfg: HeadConfig, embed_dim: int) -> tuple[DINOHead, DINOHead]:
    """(dino_head, ibot_head) for a backbone of width `embed_dim`.

    The iBOT head is the same module as the DINO head unless `cfg.ibot_separate_head`, in which
    case it is a second head with the `ibot_*` sizes (the ViT-L/g recipe).
    """
    dino_head = DINOHead(
        embed_dim,
        cfg.n_prototypes,
        hidden_dim=cfg.hidden_dim,
        bottleneck_dim=cfg.bottleneck_dim,
        nlayers=cfg.nlayers,
        last_layer=cfg.last_layer,
    )
    if not cfg.ibot_separate_head:
        return dino_head, dino_head
    ibot_head = DINOHead(
        embed_dim,
        cfg.ibot_n_prototypes,
        hidden_dim=cfg.ibot_hidden_dim,
        bottleneck_dim=cfg.ibot_bottleneck_dim,
        nlayers=cfg.nlayers,
        last_layer=cfg.last_layer,
    )
    return dino_head, ibot_head
