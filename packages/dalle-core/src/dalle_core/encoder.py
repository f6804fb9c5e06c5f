"""A small bidirectional (non-causal) transformer encoder, used by `CLIP`.

Pre-norm blocks with LayerScale, as the upstream project's ``Transformer(causal=False)``:
``x = x + scale * attn(norm(x))``, ``x = x + scale * ff(norm(x))``, then a final LayerNorm.
Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels, no
materialised N x N matrix) with an optional key padding mask.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core.layers import FeedForward, LayerScale, PreNorm, dropout_layer


class SelfAttention(nn.Module):
    """Multi-head self-attention, ``x [B, N, dim] -> [B, N, dim]``, every query sees every key.

    ``mask [B, N]`` (True = a real token) hides padded keys; a row with no real token at all
    attends to everything instead of producing NaNs (its output is meant to be ignored).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.dropout = dropout
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), dropout_layer(dropout))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head)  # [B, N, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, Dh]
        attn_mask = None
        if mask is not None:
            mask = mask | ~mask.any(dim=-1, keepdim=True)  # [B, N]; all-padding rows see all
            attn_mask = mask[:, None, None, :]  # [B, 1, 1, N], broadcast over heads and queries
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, N, Dh]
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # [B, N, H * Dh]
        return self.to_out(out)  # [B, N, dim]


class Encoder(nn.Module):
    """Stack of ``depth`` pre-norm attention + GEGLU feed-forward blocks, then LayerNorm.

    Args:
        dim: model width.
        depth: number of blocks.
        heads: attention heads.
        dim_head: width of each head.
        ff_mult: hidden width of the feed-forward as a multiple of ``dim``.
        attn_dropout: dropout on attention weights and the attention output.
        ff_dropout: dropout inside the feed-forward.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
    ):
        super().__init__()
        self.layers = nn.ModuleList()
        for index in range(depth):
            self.layers.append(
                nn.ModuleList(
                    [
                        LayerScale(
                            dim,
                            index + 1,
                            PreNorm(dim, SelfAttention(dim, heads, dim_head, attn_dropout)),
                        ),
                        LayerScale(
                            dim, index + 1, PreNorm(dim, FeedForward(dim, ff_mult, ff_dropout))
                        ),
                    ]
                )
            )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x [B, N, dim]``, ``mask [B, N]`` (True = keep) -> ``[B, N, dim]``."""
        for attn, ff in self.layers:
            x = x + attn(x, mask=mask)
            x = x + ff(x)
        return self.norm(x)
