"""The transformer's one-token step for cached generation, as plain tensor operations.

Sampling one code of a small model is bound by per-operator overhead and by reading the
weights, not by arithmetic: through the modules, a step of the benchmark's config A cost about
230 operators (module calls, token shift's slices, rotary's slices and concatenation, separate
residual adds and scales). `DecodeStep` computes the same function (eval mode: no dropout) from
the same weights and cache with 80: token shift is one ``index_select`` over the
flattened history with per-position indices made once per generation call (the history's
extra last row is zeros, for neighbours off the grid); queries, keys and values go through one
matmul with per-position matrices (rotations for q and k; for v the identity, or the rotation
with ``upstream_rotary``); a position's key and value are stored with one copy through a
per-position view of the cache; the first product of each branch goes into a buffer reused
every step, whose views are made once; and each LayerScale branch joins the residual in one
``addcmul``. Tests compare it with the forward token by token, and cached generation through it
with the uncached module path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core.attention.kernels import AttentionKernel
from dalle_core.layers import LayerScale
from dalle_core.transformer import (
    Attention,
    BranchCache,
    KernelSelector,
    LayerCache,
    Transformer,
    apply_rotary,
)


def _layer_norm_args(norm: nn.LayerNorm) -> tuple:
    """``F.layer_norm``'s arguments after the input, for ``norm``."""
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps


class _IntoBuffer:
    """``h [rows, in] -> F.linear(h, weight, bias)`` written into one buffer ``[rows, out]``
    that every step reuses, so that the views a step reads of the result are made once per
    call. Under autocast (which ``out=`` products bypass) the product runs as ``F.linear`` and
    is copied in."""

    def __init__(self, linear: nn.Linear, like: Tensor, autocast: bool):
        self.weight_t, self.bias, self.autocast = linear.weight.t(), linear.bias, autocast
        self.out = like.new_empty(like.shape[0], linear.out_features)  # like: [rows, ...]

    def __call__(self, h: Tensor) -> Tensor:
        if self.autocast:
            self.out.copy_(F.linear(h, self.weight_t.t(), self.bias))
        elif self.bias is None:
            torch.mm(h, self.weight_t, out=self.out)
        else:
            torch.addmm(self.bias, h, self.weight_t, out=self.out)
        return self.out


class _Branch:
    """One residual branch of a layer, unpacked: LayerScale(PreNorm(Shifted(fn))) as plain
    weights (no module calls per step). Its cache is split into views per step ``i`` (the
    position ``start + i``; one ``unbind`` each, not a slice per step) and its first product
    goes into a reused buffer with views made once (`_IntoBuffer`)."""

    def __init__(
        self, branch: LayerScale, cache: BranchCache, kernels: KernelSelector, start: int,
        like: Tensor, rotary: bool, autocast: bool,
    ):
        prenorm = branch.fn
        fn = prenorm.fn.fn  # Attention or FeedForward
        self.scale = branch.scale  # [dim]
        self.norm = _layer_norm_args(prenorm.norm)
        sandwich = not isinstance(prenorm.norm_out, nn.Identity)
        self.norm_out = _layer_norm_args(prenorm.norm_out) if sandwich else None
        self.kernel: AttentionKernel | None = None
        history = cache.shifted_inputs  # [rows, max_len + 1, dim]
        if history is not None:
            self.history_flat = history.view(history.shape[0], -1)
            self.history_at = history[:, start:-1].unbind(1)  # per step: [rows, dim]
        if isinstance(fn, Attention):
            self.attention = fn
            self.kernel = kernels.select(fn.pattern.kind, cache.k, decoding=True)
            self.to_qkv = _IntoBuffer(fn.to_qkv, like, autocast)
            self.qkv = self.to_qkv.out.view(-1, 3, fn.heads, fn.dim_head)  # [rows, 3, H, D]
            self.rotated = torch.empty_like(self.qkv) if rotary else self.qkv  # rotated into
            self.query = self.rotated[:, 0, :, None]  # [rows, H, 1, D]
            self.new_kv = self.rotated[:, 1:]  # [rows, 2, H, D]
            self.proj_out = (fn.to_out[0].weight, fn.to_out[0].bias)
            self.kv_at = cache.kv[:, :, :, start:].unbind(3)  # per step: [rows, 2, H, D]
            self.k, self.v = cache.kv.unbind(1)  # [rows, H, max_len, D] each
        else:  # FeedForward
            self.proj_in = _IntoBuffer(fn.proj_in, like, autocast)
            self.values, self.gates = self.proj_in.out.chunk(2, dim=-1)  # [rows, dim * mult] each
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
        if transformer.shift is not None:  # per step: [dim] flat indices into the history
            self.shift_index = transformer.shift.gather_index(max_len)[start:].unbind(0)
        self.rotation = None
        if transformer.rotary_cos is not None:  # per step: [3, D, D]
            self.rotation = qkv_rotations(transformer, start, max_len, like.dtype).unbind(0)
        kernels = transformer.kernels
        options = dict(
            like=like, rotary=self.rotation is not None, autocast=torch.is_autocast_enabled(like.device.type)
        )
        self.layers = [
            (_Branch(attn, layer_cache.attn, kernels, start, **options),
             _Branch(ff, layer_cache.ff, kernels, start, **options))
            for attn, ff, layer_cache in zip(transformer.attn_branches, transformer.ff_branches, cache)
        ]

    def __call__(self, x: Tensor, position: int) -> Tensor:
        i = position - self.start
        if self.reversible:  # y1 = x1 + f(x2), y2 = x2 + g(y1), output (y1 + y2) / 2
            y1 = y2 = x
            for attn, ff in self.layers:
                y1 = self._branch(attn, y2, y1, i)
                y2 = self._branch(ff, y1, y2, i)
            return (y1 + y2) / 2
        for attn, ff in self.layers:
            x = self._branch(attn, x, x, i)
            x = self._branch(ff, x, x, i)
        return x

    def _branch(self, branch: _Branch, x: Tensor, residual: Tensor, i: int) -> Tensor:
        """``residual + scale * norm_out(fn(shift(norm(x))))`` for ``x [rows, dim]`` at step ``i``."""
        h = F.layer_norm(x, *branch.norm)
        if self.shift_index is not None:
            branch.history_at[i].copy_(h)
            h = branch.history_flat.index_select(1, self.shift_index[i])
        if branch.kernel is not None:
            h = self._attend(branch, h, i)
        else:  # the GEGLU feed-forward
            branch.proj_in(h)
            h = F.linear(F.gelu(branch.gates).mul_(branch.values), *branch.proj_out)
        if branch.norm_out is not None:
            h = F.layer_norm(h, *branch.norm_out)
        return torch.addcmul(residual, h, branch.scale)

    def _attend(self, branch: _Branch, h: Tensor, i: int) -> Tensor:
        branch.to_qkv(h)
        if self.rotation is not None:
            torch.matmul(branch.qkv, self.rotation[i], out=branch.rotated)
        branch.kv_at[i].copy_(branch.new_kv)
        position = self.start + i
        end = position + 1
        mask = self.key_padding_mask[:, :end] if self.key_padding_mask is not None else None
        out = branch.kernel(
            branch.query, branch.k[:, :, :end], branch.v[:, :, :end], branch.attention.pattern,
            q_offset=position, key_padding_mask=mask,
        )  # [rows, H, 1, D]
        return F.linear(out.reshape(h.shape[0], -1), *branch.proj_out)


def qkv_rotations(transformer: Transformer, start: int, end: int, dtype: torch.dtype) -> Tensor:
    """Per position ``p`` in ``start .. end - 1``: ``[3, D, D]`` matrices for (q, k, v) of one
    token, rotating queries and keys (`rotation_matrices`), and values with the transformer's
    ``upstream_rotary`` (else keeping them): ``[end - start, 3, D, D]``."""
    rotation = rotation_matrices(
        transformer.rotary_cos[start:end], transformer.rotary_sin[start:end], transformer.rotary_features
    ).to(dtype)  # [n, D, D]
    values = rotation
    if not transformer.upstream_rotary:
        values = torch.eye(rotation.shape[-1], dtype=dtype, device=rotation.device).expand_as(rotation)
    return torch.stack((rotation, rotation, values), dim=1)


def rotation_matrices(cos: Tensor, sin: Tensor, rot: int) -> Tensor:
    """`apply_rotary` as matrices: ``[n, D, D]`` from its tables ``cos, sin [n, D]``, so that
    ``x @ rotation[p] == apply_rotary(x, cos[p], sin[p], rot)`` for ``x [..., D]`` (row ``i``
    of ``rotation[p]`` is the rotated unit vector ``e_i``; the rotation is linear)."""
    n, dim_head = cos.shape
    identity = torch.eye(dim_head, dtype=cos.dtype, device=cos.device).expand(n, dim_head, dim_head)
    return apply_rotary(identity, cos[:, None], sin[:, None], rot)
