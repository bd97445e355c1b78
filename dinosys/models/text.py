"""The causal CLIP text transformer (token + position embedding, pre-norm blocks, final norm,
end-of-text pooling, linear projection).

Parameter names are open_clip's text tower (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.{i}.{ln_1,attn.in_proj_weight,attn.in_proj_bias,attn.out_proj,ln_2,
mlp.c_fc,mlp.c_proj}``, ``ln_final``, ``text_projection`` of shape (width, embed_dim)), so a
state dict saved here loads as-is into ``open_clip.transformer.TextTransformer`` and into the
text part of ``open_clip.CLIP``. Attention is SDPA with a causal mask; since every pooled token
only sees tokens before it, the batch is cut to its longest text before the blocks (identical
outputs, much less work for short captions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinosys.config import ConfigError, Section, check_range
from dinosys.data.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE
from dinosys.errors import UserError


@dataclass
class TextConfig(Section):
    """Text tower size (open_clip ``text_cfg`` fields of the same names)."""

    width: int = 512  # text transformer width
    layers: int = 12  # text transformer blocks
    heads: int = 8  # text attention heads
    context_length: int = CONTEXT_LENGTH  # tokens per caption, start and end tokens included
    vocab_size: int = VOCAB_SIZE  # BPE vocabulary size (the CLIP tokenizer's)
    mlp_ratio: float = 4.0  # MLP hidden size / width

    def validate(self) -> None:
        check_range(self.layers, "model.text.layers", 1)
        check_range(self.heads, "model.text.heads", 1)
        check_range(self.context_length, "model.text.context_length", 2)
        if self.width % self.heads:
            raise ConfigError(f"config key 'model.text.width': {self.width} is not divisible by "
                            f"model.text.heads={self.heads}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with ``nn.MultiheadAttention``'s parameter names."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, W) -> (B, L, W), token i attending to tokens <= i."""
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class ResidualBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)) (GELU MLP, open_clip names)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        """One pre-norm residual block."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The block stack (``resblocks``), optionally recomputing activations in backward."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, mlp_ratio)
                                       for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        """Run every block."""
        for blk in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class TextTransformer(nn.Module):
    """Token ids (B, L<=context) -> text embeddings (B, embed_dim), pooled at end-of-text."""

    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """open_clip's initialisation (normal, depth-scaled output projections)."""
        width, layers = self.cfg.width, self.cfg.layers
        with torch.no_grad():
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
            proj_std = width ** -0.5 * (2 * layers) ** -0.5
            for blk in self.transformer.resblocks:
                nn.init.normal_(blk.attn.in_proj_weight, std=width ** -0.5)
                blk.attn.in_proj_bias.zero_()
                nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
                blk.attn.out_proj.bias.zero_()
                nn.init.normal_(blk.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                blk.mlp.c_fc.bias.zero_()
                nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
                blk.mlp.c_proj.bias.zero_()
                blk.ln_1.reset_parameters()
                blk.ln_2.reset_parameters()
            self.ln_final.reset_parameters()
            nn.init.normal_(self.text_projection, std=width ** -0.5)

    def forward(self, text: Tensor) -> Tensor:
        """Embeddings (B, embed_dim), not normalised; ``text`` int64 (B, L), L <= context."""
        if text.ndim != 2 or text.dtype != torch.long:
            raise UserError(f"text tower input must be int64 token ids (B, L); "
                            f"got {text.dtype} {tuple(text.shape)}")
        if text.shape[1] > self.context_length:
            raise UserError(f"text of {text.shape[1]} tokens is longer than the context "
                            f"{self.context_length}; tokenize with context_length="
                            f"{self.context_length}")
        eot = text.argmax(dim=-1)
        used = int(eot.max()) + 1 if text.numel() else 1
        text = text[:, :used]
        x = self.token_embedding(text) + self.positional_embedding[:used].to(
            self.token_embedding.weight.dtype)
        x = self.ln_final(self.transformer(x))
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return pooled @ self.text_projection

    def config_dict(self) -> dict:
        """The architecture as plain data (saved in exported config.json)."""
        return asdict(self.cfg)

    def forward_flops(self, batch: int, tokens: int) -> float:
        """Matmul FLOPs of one forward pass over ``tokens`` tokens per text."""
        w, n = self.cfg.width, tokens
        per_block = 2 * n * (4 * w * w + 2 * self.cfg.mlp_ratio * w * w) + 2 * n * n * w
        return batch * (self.cfg.layers * per_block + 2 * w * self.embed_dim)

