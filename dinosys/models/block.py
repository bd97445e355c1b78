"""The pre-norm transformer block, run over a list of token groups, with stochastic depth.

Stochastic depth (drop path) follows DINOv2: at rates up to 0.1 each sample's residual branch is
zeroed with probability ``rate`` and the rest rescaled by 1/(1-rate); above 0.1 the "efficient"
variant computes the branch only on a random subset of floor((1-rate) * B) samples of each group
and adds it back to those samples scaled by B/subset, saving the compute of the dropped ones.

Token packing (``layout`` given): the groups arrive as ONE (T, D) tensor of all their tokens,
so the norms, projections and FFN run as single matrix multiplies over every crop; attention
splits the packed qkv back into its groups (each a dense batch of equal-length sequences, which
is block-diagonal attention over the pack). Same function, same random draws, as the list form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinosys.models.attention import Attention
from dinosys.models.layers import LayerScale, Mlp, SwiGLUFFNFused, drop_path_per_sample

Branch = Callable[[list[Tensor]], list[Tensor]]
PackedBranch = Callable[[Tensor, "Layout"], Tensor]
Layout = tuple[tuple[int, int], ...]  # (sequences, tokens per sequence) of each packed group

EFFICIENT_DROP_PATH_ABOVE = 0.1


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); input a Tensor or a list of them."""

    def __init__(self, dim: int, num_heads: int, ffn: str, ffn_hidden: int,
                 layerscale_init: float | None, drop_path: float, attn_backend: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_backend)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLUFFNFused(dim, ffn_hidden) if ffn == "swiglu" else Mlp(dim, ffn_hidden)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = float(drop_path)
        self.activation_checkpointing = False

    def attn_branch(self, xs: list[Tensor]) -> list[Tensor]:
        """The attention residual branch of each group (before stochastic depth)."""
        return [self.ls1(o) for o in self.attn([self.norm1(x) for x in xs])]

    def ffn_branch(self, xs: list[Tensor]) -> list[Tensor]:
        """The feed-forward residual branch of each group (before stochastic depth)."""
        return [self.ls2(self.mlp(self.norm2(x))) for x in xs]

    def forward(self, x: Tensor | list[Tensor], layout: Layout | None = None
                ) -> Tensor | list[Tensor]:
        """Run the block; a Tensor (B, N, D) in gives a Tensor out, a list gives a list; with
        ``layout``, ``x`` is the packed (T, D) tokens of those groups and so is the output."""
        if layout is not None:
            if self.activation_checkpointing and torch.is_grad_enabled():
                return checkpoint(self._forward_packed, x, layout, use_reentrant=False)
            return self._forward_packed(x, layout)
        xs = [x] if isinstance(x, Tensor) else list(x)
        if self.activation_checkpointing and torch.is_grad_enabled():
            out = list(checkpoint(self._forward_list, *xs, use_reentrant=False))
        else:
            out = self._forward_list(*xs)
        return out[0] if isinstance(x, Tensor) else out

    def _forward_list(self, *xs: Tensor) -> list[Tensor]:
        out = self._add_residual(list(xs), self.attn_branch)
        return self._add_residual(out, self.ffn_branch)

    def _add_residual(self, xs: list[Tensor], branch: Branch) -> list[Tensor]:
        rate = self.drop_path
        if not self.training or rate == 0.0:
            return [x + o for x, o in zip(xs, branch(xs))]
        if rate <= EFFICIENT_DROP_PATH_ABOVE:
            return [x + drop_path_per_sample(o, rate) for x, o in zip(xs, branch(xs))]
        subsets = []
        for x in xs:
            batch = x.shape[0]
            keep = max(int(batch * (1.0 - rate)), 1)
            subsets.append(torch.randperm(batch, device=x.device)[:keep])
        outs = branch([x[idx] for x, idx in zip(xs, subsets)])
        return [
            torch.index_add(x.flatten(1), 0, idx, o.to(x.dtype).flatten(1),
                            alpha=x.shape[0] / idx.numel()).view_as(x)
            for x, idx, o in zip(xs, subsets, outs)
        ]

    # ------------------------------------------------------------------ packed tokens

    def attn_branch_packed(self, x: Tensor, layout: Layout) -> Tensor:
        """The attention branch on packed tokens (T, D)."""
        return self.ls1(self.attn.forward_packed(self.norm1(x), layout))

    def ffn_branch_packed(self, x: Tensor, layout: Layout) -> Tensor:
        """The feed-forward branch on packed tokens (T, D)."""
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward_packed(self, x: Tensor, layout: Layout) -> Tensor:
        x = self._add_residual_packed(x, layout, self.attn_branch_packed)
        return self._add_residual_packed(x, layout, self.ffn_branch_packed)

    def _add_residual_packed(self, x: Tensor, layout: Layout, branch: PackedBranch) -> Tensor:
        rate = self.drop_path
        if not self.training or rate == 0.0:
            return x + branch(x, layout)
        sizes = [b * n for b, n in layout]
        if rate <= EFFICIENT_DROP_PATH_ABOVE:
            out = branch(x, layout)
            parts = [drop_path_per_sample(o.view(b, n, -1), rate).view(b * n, -1)
                     for o, (b, n) in zip(out.split(sizes), layout)]
            return x + torch.cat(parts)
        rows, sub_layout, alphas, offset = [], [], [], 0
        for b, n in layout:  # the same draws, in the same order, as the list form
            keep = max(int(b * (1.0 - rate)), 1)
            idx = torch.randperm(b, device=x.device)[:keep]
            rows.append(offset + (idx[:, None] * n
                                  + torch.arange(n, device=x.device)).flatten())
            sub_layout.append((keep, n))
            alphas.append(b / keep)
            offset += b * n
        index = torch.cat(rows)
        out = branch(x[index], tuple(sub_layout))
        scaled = torch.cat([o * a for o, a in zip(out.split([k * n for k, n in sub_layout]),
                                                   alphas)])
        return torch.index_add(x, 0, index, scaled.to(x.dtype))
