"""The transformer's one-token step for cached generation, as plain tensor operations.

Sampling one code of a small model is bound by per-operator overhead and by reading the
weights, not by arithmetic: through the modules, a step of the benchmark's config A cost about
230 operators (module calls, token shift's slices, rotary's slices and concatenation, separate
residual adds and scales). `DecodeStep` computes the same function (eval mode: no dropout) from
the same weights and cache with about 140: token shift is one ``index_select`` over the
flattened history with per-position indices made once per generation call (the history's
extra last row is zeros, for neighbours off the grid), queries and keys rotate in one matmul
with a per-position rotation matrix, the cache is written through per-position views, and each
LayerScale branch joins the residual in one ``addcmul``. Tests compare it with the forward token
by token, and cached generation through it with the uncached module path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core.attention.kernels import AttentionKernel
from dalle_core.layers import LayerScale, geglu
from dalle_core.transformer import Attention, BranchCache, KernelSelector, LayerCache, Transformer


def _layer_norm_args(norm: nn.LayerNorm) -> tuple:
    """``F.layer_norm``'s arguments after the input, for ``norm``."""
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps


class _Branch:
    """One residual branch of a layer, unpacked: LayerScale(PreNorm(Shifted(fn))) as plain
    weights (no module calls per step), with its cache split into per-position views (one
    ``unbind`` each, not a slice per step)."""

    def __init__(self, branch: LayerScale, cache: BranchCache, kernels: KernelSelector):
        prenorm = branch.fn
        fn = prenorm.fn.fn  # Attention or FeedForward
        self.scale = branch.scale  # [dim]
        self.norm = _layer_norm_args(prenorm.norm)
        sandwich = not isinstance(prenorm.norm_out, nn.Identity)
        self.norm_out = _layer_norm_args(prenorm.norm_out) if sandwich else None
        self.cache = cache
        self.kernel: AttentionKernel | None = None
        history = cache.shifted_inputs  # [rows, max_len + 1, dim]
        self.history_flat = history.view(history.shape[0], -1) if history is not None else None
        self.history_at = history.unbind(1) if history is not None else None  # [rows, dim] each
        if isinstance(fn, Attention):
            self.attention = fn
            self.kernel = kernels.select(fn.pattern.kind, cache.k, decoding=True)
            self.qkv_weight = fn.to_qkv.weight
            self.proj_out = (fn.to_out[0].weight, fn.to_out[0].bias)
            self.k_at, self.v_at = cache.k.unbind(2), cache.v.unbind(2)  # [rows, H, D] each
        else:  # FeedForward
            self.proj_in = (fn.proj_in.weight, fn.proj_in.bias)
            self.proj_out = (fn.proj_out.weight, fn.proj_out.bias)


class DecodeStep:
    """``x [rows, dim]`` of one new token per row at sequence ``position`` -> the transformer's
    output ``[rows, dim]``, reading and extending ``cache`` (filled up to ``position`` by a
    prefill through `Transformer.forward`). Equal to ``transformer(x[:, None], offset=position,
    cache=cache)[:, 0]`` in eval mode without gradients.

    ``start``: the first position it will be called for (tables are made from there on);
    ``key_padding_mask [rows, max_len]`` (True = keep) hides padded text, as in the forward.
    """

    def __init__(
        self, transformer: Transformer, cache: list[LayerCache], start: int, key_padding_mask: Tensor | None
    ):
        like = cache[0].attn.k  # [rows, H, max_len, D]
        max_len = like.shape[2]
        self.start = start
        self.reversible = transformer.reversible is not None
        self.key_padding_mask = key_padding_mask
        self.shift_index = None
        if transformer.shift is not None:  # per position: [dim] flat indices into the history
            self.shift_index = transformer.shift.gather_index(max_len)[start:].unbind(0)
        self.rotation = None
        if transformer.rotary_cos is not None:  # per position: [D, D], x @ rotation = apply_rotary(x)
            self.rotation = rotation_matrices(
                transformer.rotary_cos[start:max_len], transformer.rotary_sin[start:max_len],
                transformer.rotary_features,
            ).to(like.dtype).unbind(0)
        kernels = transformer.kernels
        self.layers = [
            (_Branch(attn, layer_cache.attn, kernels), _Branch(ff, layer_cache.ff, kernels))
            for attn, ff, layer_cache in zip(transformer.attn_branches, transformer.ff_branches, cache)
        ]

    def __call__(self, x: Tensor, position: int) -> Tensor:
        if self.reversible:  # y1 = x1 + f(x2), y2 = x2 + g(y1), output (y1 + y2) / 2
            y1 = y2 = x
            for attn, ff in self.layers:
                y1 = self._branch(attn, y2, y1, position)
                y2 = self._branch(ff, y1, y2, position)
            return (y1 + y2) / 2
        for attn, ff in self.layers:
            x = self._branch(attn, x, x, position)
            x = self._branch(ff, x, x, position)
        return x

    def _branch(self, branch: _Branch, x: Tensor, residual: Tensor, position: int) -> Tensor:
        """``residual + scale * norm_out(fn(shift(norm(x))))`` for ``x [rows, dim]``."""
        h = F.layer_norm(x, *branch.norm)
        if branch.history_flat is not None:
            branch.history_at[position].copy_(h)
            h = branch.history_flat.index_select(1, self.shift_index[position - self.start])
        if branch.kernel is not None:
            h = self._attend(branch, h, position)
        else:  # the GEGLU feed-forward
            h = F.linear(geglu(F.linear(h, *branch.proj_in)), *branch.proj_out)
        if branch.norm_out is not None:
            h = F.layer_norm(h, *branch.norm_out)
        return torch.addcmul(residual, h, branch.scale)

    def _attend(self, branch: _Branch, h: Tensor, position: int) -> Tensor:
        attn: Attention = branch.attention
        cache = branch.cache
        rows = h.shape[0]
        qkv = F.linear(h, branch.qkv_weight).view(rows, 3, attn.heads, attn.dim_head)
        qk = qkv[:, :2]  # [rows, 2, H, D]
        if self.rotation is not None:
            qk = torch.matmul(qk, self.rotation[position - self.start])
        branch.k_at[position].copy_(qk[:, 1])
        branch.v_at[position].copy_(qkv[:, 2])
        end = position + 1
        mask = self.key_padding_mask[:, :end] if self.key_padding_mask is not None else None
        out = branch.kernel(
            qk[:, 0, :, None], cache.k[:, :, :end], cache.v[:, :, :end], attn.pattern,
            q_offset=position, key_padding_mask=mask,
        )  # [rows, H, 1, D]
        return F.linear(out.reshape(rows, -1), *branch.proj_out)


def rotation_matrices(cos: Tensor, sin: Tensor, rot: int) -> Tensor:
    """`apply_rotary` as matrices: ``[n, D, D]`` from its tables ``cos, sin [n, D]``, so that
    ``x @ rotation[p] == apply_rotary(x, cos[p], sin[p], rot)`` for ``x [..., D]``."""
    n, dim_head = cos.shape
    half = rot // 2
    # output feature j reads x_j * cos_j + x_source(j) * sin_j (sin is 0 beyond rot)
    source = torch.cat((torch.arange(half, rot), torch.arange(half), torch.arange(rot, dim_head)))
    rotation = torch.diag_embed(cos)  # [n, D, D]
    rotation[:, source, torch.arange(dim_head)] += sin
    return rotation
