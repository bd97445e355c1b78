"""The backbone's config section (``model:`` of a run), beside the ViT it configures (vit.py)."""

from __future__ import annotations

from dataclasses import dataclass

from dinosys.config import Section, check_bounds, check_choice, check_range


@dataclass
class BackboneConfig(Section):
    """Vision transformer backbone (see dinosys.models.create_backbone)."""

    # vit_tiny, vits14, vitb14, vitl14, vitg14; a "_reg" suffix adds 4 registers
    arch: str = "vits14"
    img_size: int = 224  # image size the learned position embedding is laid out for
    patch_size: int | None = None  # None: the arch's (14; 4 for vit_tiny)
    in_chans: int = 3  # input channels
    embed_dim: int | None = None  # None: the arch's
    depth: int | None = None  # blocks (None: the architecture's)
    num_heads: int | None = None  # attention heads (None: the architecture's)
    ffn: str | None = None  # "mlp" or "swiglu"; None: the arch's
    num_registers: int | None = None  # None: 4 for "_reg" archs, else 0
    drop_path_rate: float = 0.0  # stochastic depth rate (of the last block when not uniform)
    drop_path_uniform: bool = True  # the same drop-path rate in every block (else linear in depth)
    layerscale_init: float | None = 1e-5  # None disables LayerScale
    attn_backend: str = "auto"  # auto, sdpa, xformers, math
    # pos-embed resize to another grid: None follows the released layouts (register models: an
    # explicit size with antialias; the others: scale_factor (n + 0.1) / M, no antialias)
    interpolate_offset: float | None = None

    def validate(self) -> None:
        check_bounds(self, "model", {
            "img_size": (1, None), "patch_size": (1, None), "in_chans": (1, None),
            "embed_dim": (1, None), "depth": (1, None), "num_heads": (1, None),
            "num_registers": (0, None), "layerscale_init": (0, None)})
        if self.interpolate_offset is not None:
            check_range(self.interpolate_offset, "model.interpolate_offset", 0.0, 1.0)
        check_choice(self.attn_backend, ("auto", "sdpa", "xformers", "math"), "model.attn_backend")
        if self.ffn is not None:
            check_choice(self.ffn, ("mlp", "swiglu"), "model.ffn")
        check_range(self.drop_path_rate, "model.drop_path_rate", 0.0, 1.0)
