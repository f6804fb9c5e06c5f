"""Launchers for the Triton kernels and the autograd function that ties them together.

`sparse_attention` is the differentiable full-sequence entry point (queries and keys are the
same ``N`` positions from 0); `sparse_decode` serves cached generation steps (forward only).
`attention_forward` / `attention_backward` take optional output buffers so tests can poison them.
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from dalle_attn_sparse import triton_kernels as tk
from dalle_attn_sparse.kernel import MAX_HEAD_DIM, LaunchConfig, interpreting
from dalle_attn_sparse.layout import (
    BlockLayout,
    attention_layout,
    decode_layout,
    inverse_order,
    sequence_order,
)
from dalle_core.attention.patterns import AttentionPattern


def _pattern_args(pattern: AttentionPattern) -> dict:
    return dict(
        text_len=pattern.text_len,
        fmap=pattern.fmap_size,
        reach=(pattern.kernel_size // 2) * pattern.dilation,
        dilation=pattern.dilation,
        sparse_block=pattern.block_size,
        local_blocks=pattern.num_local_blocks,
        KIND=tk.KIND_CODES[pattern.kind],
    )


def _dtype_args(dtype: torch.dtype, head_dim: int) -> dict:
    return dict(
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        UPCAST=interpreting() and dtype != torch.float32,
        # fp32 in IEEE precision, as the reference computes (TF32 would lose ~3 digits)
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


def _kpm_args(key_padding_mask: Tensor | None, like: Tensor) -> tuple[Tensor, int, bool]:
    """(int8 mask ``[B, N]`` or a dummy, its batch stride, whether there is one)."""
    if key_padding_mask is None:
        return torch.empty(1, dtype=torch.int8, device=like.device), 0, False
    kpm = key_padding_mask.to(device=like.device, dtype=torch.int8).contiguous()
    return kpm, kpm.stride(0), True


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: AttentionPattern,
    layout: BlockLayout,
    positions: Tensor,
    key_padding_mask: Tensor | None,
    config: LaunchConfig,
    out: Tensor | None = None,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward of ``N`` queries over the same ``N`` keys. q, k, v ``[B, H, N, D]`` in the
    layout's order; ``positions [N]`` their sequence positions. Returns ``out [B, H, N, D]`` and
    ``lse [B * H, N]`` (fp32, base 2), written into ``out`` / ``lse`` when given."""
    batch, heads, n, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(batch * heads, n, dtype=torch.float32, device=q.device) if lse is None else lse
    kpm, kpm_stride, has_kpm = _kpm_args(key_padding_mask, q)
    grid = (layout.n_row_blocks, batch * heads)
    tk.attention_forward_kernel[grid](
        q, k, v, out, lse, kpm, positions, layout.row_ptr, layout.col_idx, layout.full,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), kpm_stride,
        heads, n, head_dim, _qk_scale(head_dim),
        HAS_KPM=has_kpm, BLOCK_M=layout.block_m, BLOCK_N=layout.block_n,
        num_warps=config.warps(head_dim), num_stages=config.num_stages,
        **_pattern_args(pattern), **_dtype_args(q.dtype, head_dim),
    )
    return out, lse


def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    pattern: AttentionPattern,
    layout: BlockLayout,
    positions: Tensor,
    key_padding_mask: Tensor | None,
    config: LaunchConfig,
    grads: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv ``[B, H, N, D]`` of `attention_forward`; written into ``grads`` when given."""
    batch, heads, n, head_dim = q.shape
    grad_out = _last_dim_contiguous(grad_out)
    delta = (out.float() * grad_out.float()).sum(-1).reshape(batch * heads, n)  # rowsum(o * do)
    if grads is None:
        grads = tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    dq, dk, dv = grads
    kpm, kpm_stride, has_kpm = _kpm_args(key_padding_mask, q)
    common = dict(
        HAS_KPM=has_kpm, BLOCK_M=layout.block_m, BLOCK_N=layout.block_n,
        num_warps=config.warps(head_dim), num_stages=config.num_stages,
        **_pattern_args(pattern), **_dtype_args(q.dtype, head_dim),
    )
    scale = 1.0 / math.sqrt(head_dim)
    tk.attention_backward_dkdv_kernel[(layout.n_col_blocks, batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, kpm, positions,
        layout.t_row_ptr, layout.t_col_idx, layout.t_full,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        *_strides(dk), *_strides(dv), kpm_stride,
        heads, n, head_dim, _qk_scale(head_dim), scale, **common,
    )
    tk.attention_backward_dq_kernel[(layout.n_row_blocks, batch * heads)](
        q, k, v, grad_out, lse, delta, dq, kpm, positions,
        layout.row_ptr, layout.col_idx, layout.full,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), kpm_stride,
        heads, n, head_dim, _qk_scale(head_dim), scale, **common,
    )
    return dq, dk, dv


def _qk_scale(head_dim: int) -> float:
    """Softmax scale in base-2 units: ``log2(e) / sqrt(D)``."""
    return math.log2(math.e) / math.sqrt(head_dim)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, layout, positions, key_padding_mask, config):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = attention_forward(q, k, v, pattern, layout, positions, key_padding_mask, config)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.layout, ctx.positions = pattern, layout, positions
        ctx.key_padding_mask, ctx.config = key_padding_mask, config
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            grad_out, q, k, v, out, lse, ctx.pattern, ctx.layout, ctx.positions,
            ctx.key_padding_mask, ctx.config,
        )
        return dq, dk, dv, None, None, None, None, None


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: AttentionPattern,
    key_padding_mask: Tensor | None = None,
    config: LaunchConfig | None = None,
) -> Tensor:
    """Differentiable block-sparse attention of the first ``N`` positions of ``pattern``.

    q, k, v ``[B, H, N, D]`` (``N <= pattern.seq_len``, ``D <= 128``), fp32 / fp16 / bf16;
    ``key_padding_mask [B, N]`` bool (True = keep). Returns ``[B, H, N, D]``.
    """
    config = config or LaunchConfig()
    n = q.shape[-2]
    _check_inputs(q, k, v, key_padding_mask)
    if k.shape[-2] != n:
        raise ValueError(f"sparse_attention takes as many keys as queries (the whole sequence), got "
                         f"{n} queries and {k.shape[-2]} keys; use sparse_decode for cached steps")
    pattern.check_length(n, n)
    device = q.device
    layout = attention_layout(pattern, n, config.block_m, config.block_n, device)
    order = sequence_order(pattern, n, device)
    if order is not None:  # visit the sequence permuted (axial_col: column-major image)
        q, k, v = (t.index_select(2, order) for t in (q, k, v))  # [B, H, N, D]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.index_select(1, order.to(key_padding_mask.device))
    positions = kernel_positions(pattern, n, device)
    out = _SparseAttention.apply(q, k, v, pattern, layout, positions, key_padding_mask, config)
    if order is not None:
        out = out.index_select(2, inverse_order(pattern, n, device))
    return out


def kernel_positions(pattern: AttentionPattern, n: int, device: torch.device) -> Tensor:
    """Sequence position of each of the ``n`` slots in the kernel's order (int32 ``[n]``)."""
    order = sequence_order(pattern, n, device)
    return (torch.arange(n, device=device) if order is None else order).to(torch.int32)


def sparse_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: AttentionPattern,
    q_offset: int,
    key_padding_mask: Tensor | None = None,
    config: LaunchConfig | None = None,
) -> Tensor:
    """Cached generation: queries at positions ``q_offset ..`` over keys ``0 .. Nk - 1``, each
    query row walking its row of the per-position layout (forward only).

    q ``[B, H, Nq, D]``, k, v ``[B, H, Nk, D]``; returns ``[B, H, Nq, D]``.
    """
    config = config or LaunchConfig()
    _check_inputs(q, k, v, key_padding_mask)
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[-2]
    pattern.check_length(n_q, n_k, q_offset)
    if n_k < q_offset + n_q:
        raise ValueError(f"the cache holds {n_k} keys, fewer than the {q_offset + n_q} positions up to "
                         f"the last query (q_offset {q_offset} + {n_q} queries)")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    layout = decode_layout(pattern, config.decode_block_n, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    kpm, kpm_stride, has_kpm = _kpm_args(key_padding_mask, q)
    args = _pattern_args(pattern)
    tk.decode_kernel[(n_q, batch * heads)](
        q, k, v, out, kpm, layout.row_ptr, layout.col_idx, layout.full,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), kpm_stride,
        heads, n_k, q_offset, head_dim, _qk_scale(head_dim),
        HAS_KPM=has_kpm, BLOCK_N=layout.block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=config.warps(head_dim), **args,
    )
    return out


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit "
                         f"together ([B, H, Nq, D] and two [B, H, Nk, D])")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} is larger than the kernels' {MAX_HEAD_DIM}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[-2]):
        raise ValueError(f"key_padding_mask must be [B, Nk] = {(k.shape[0], k.shape[-2])}, "
                         f"got {tuple(key_padding_mask.shape)}")
