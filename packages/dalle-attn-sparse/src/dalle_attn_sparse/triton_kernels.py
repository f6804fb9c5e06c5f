"""Triton kernels: block-sparse causal attention (forward, dK/dV, dQ) and a cached decode step.

Flash-attention style: each program holds one tile of queries (or keys) and walks the tiles its
`dalle_attn_sparse.layout.BlockLayout` row lists, with an online softmax in base 2, so no
``N x N`` matrix is ever stored. Inside a tile that is not fully allowed, the element mask is
computed from sequence positions by `_allowed`, the same rule as `AttentionPattern.allowed`.

Scores are kept in base-2 units: ``s = q.k * softmax_scale * log2(e)`` and the saved
log-sum-exp ``lse`` is ``log2(sum(exp2(s)))``; ``p = exp2(s - lse)``.

``UPCAST`` (the CPU interpreter, which has no bf16 matmul): dot operands are cast to fp32,
after rounding ``p`` and ``ds`` to the input dtype as the GPU path does.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: `AttentionPattern.kind` -> the ``KIND`` constant of the kernels
KIND_CODES = {"full": 0, "axial_row": 1, "axial_col": 2, "conv_like": 3, "sparse": 4, "conv_like_trailing": 5}


@triton.jit
def _allowed(
    q_pos, k_pos, text_len, fmap, reach, dilation, sparse_block, local_blocks, KIND: tl.constexpr
):
    """`AttentionPattern.allowed` on broadcastable int32 position tensors (True = attend).

    C-style ``//`` and ``%`` differ from Python's for negative operands, which appear only for
    text keys, where the result is decided by ``k_pos < text_len`` alone.
    """
    causal = k_pos <= q_pos
    if KIND == 0:
        ok = causal
    else:
        q_img = q_pos - text_len
        k_img = k_pos - text_len
        if KIND == 1:  # axial_row
            rule = (q_img // fmap) == (k_img // fmap)
        elif KIND == 2:  # axial_col
            rule = (q_img % fmap) == (k_img % fmap)
        elif KIND == 3 or KIND == 5:  # conv_like (centred window), conv_like_trailing (ends at the query)
            d_row = k_img // fmap - q_img // fmap
            d_col = k_img % fmap - q_img % fmap
            if KIND == 5:
                d_row += reach
                d_col += reach
            rule = (
                (tl.abs(d_row) <= reach)
                & (tl.abs(d_col) <= reach)
                & (d_row % dilation == 0)
                & (d_col % dilation == 0)
            )
        else:  # sparse: the query's block and the local_blocks - 1 before it
            rule = (k_pos // sparse_block) > (q_pos // sparse_block - local_blocks)
        ok = causal & ((k_pos < text_len) | rule)
    return ok


@triton.jit
def _tile(base, b, h, rows, offs_d, stride_b, stride_h, stride_n):
    """Pointers ``[len(rows), len(offs_d)]`` to rows ``rows`` of head ``(b, h)`` of a ``[B, H, N, D]``
    tensor at ``base`` (its last dimension contiguous)."""
    return base + b * stride_b + h * stride_h + rows[:, None] * stride_n + offs_d[None, :]


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    """A ``tl.dot`` operand: fp32 in the interpreter, unchanged on the GPU."""
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _masked_scores(
    s, full, q_pos, k_pos, q_valid, k_valid, kpm_ptrs, text_len, fmap, reach, dilation, sparse_block,
    local_blocks, KIND: tl.constexpr, HAS_KPM: tl.constexpr,
):
    """Scores ``s [M, N]`` with disallowed, out-of-range and padded keys set to -inf
    (``kpm_ptrs [N]``: the keys' entries of the padding mask, read when ``HAS_KPM``)."""
    if full == 0:
        ok = _allowed(
            q_pos[:, None], k_pos[None, :], text_len, fmap, reach, dilation, sparse_block,
            local_blocks, KIND,
        )
        ok = ok & q_valid[:, None] & k_valid[None, :]
        s = tl.where(ok, s, float("-inf"))
    if HAS_KPM:
        keep = tl.load(kpm_ptrs, mask=k_valid, other=0)
        s = tl.where(keep[None, :] != 0, s, float("-inf"))
    return s


@triton.jit
def attention_forward_kernel(
    Q, K, V, OUT, LSE, KPM, POS, ROW_PTR, COL_IDX, COL_FULL,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on, stride_kpm,
    H, N, HEAD_DIM, qk_scale,
    text_len, fmap, reach, dilation, sparse_block, local_blocks,
    KIND: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: ``BLOCK_M`` queries of one (batch, head). Grid ``(cdiv(N, BLOCK_M), B * H)``.

    Writes ``OUT [B, H, N, D]`` and ``LSE [B * H, N]`` (fp32, base 2) for backward.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_valid = offs_m < N
    d_valid = offs_d < HEAD_DIM
    q_ptrs = _tile(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn)
    q = _operand(tl.load(q_ptrs, mask=q_valid[:, None] & d_valid[None, :], other=0.0), UPCAST)
    q_pos = tl.load(POS + offs_m, mask=q_valid, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, base 2
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = tl.load(ROW_PTR + pid_m)
    end = tl.load(ROW_PTR + pid_m + 1)
    for idx in range(start, end):
        kb = tl.load(COL_IDX + idx)
        full = tl.load(COL_FULL + idx)
        offs_k = kb * BLOCK_N + offs_n
        k_valid = offs_k < N
        kv_mask = k_valid[:, None] & d_valid[None, :]
        k = tl.load(_tile(K, b, h, offs_k, offs_d, stride_kb, stride_kh, stride_kn),
                    mask=kv_mask, other=0.0)
        v = tl.load(_tile(V, b, h, offs_k, offs_d, stride_vb, stride_vh, stride_vn),
                    mask=kv_mask, other=0.0)
        k_pos = tl.load(POS + offs_k, mask=k_valid, other=0)
        s = tl.dot(q, tl.trans(_operand(k, UPCAST)), input_precision=PRECISION) * qk_scale  # [M, N]
        s = _masked_scores(s, full, q_pos, k_pos, q_valid, k_valid, KPM + b * stride_kpm + offs_k,
                           text_len, fmap, reach, dilation, sparse_block, local_blocks, KIND, HAS_KPM)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        p_op = _operand(p.to(V.dtype.element_ty), UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p_op, _operand(v, UPCAST), input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past N: every real row sees position 0
    out = acc / l_safe[:, None]
    o_ptrs = _tile(OUT, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=q_valid[:, None] & d_valid[None, :])
    tl.store(LSE + pid_bh * N + offs_m, m_i + tl.math.log2(l_safe), mask=q_valid)


@triton.jit
def attention_backward_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPM, POS, T_ROW_PTR, T_COL_IDX, T_FULL,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_kpm,
    H, N, HEAD_DIM, qk_scale, softmax_scale,
    text_len, fmap, reach, dilation, sparse_block, local_blocks,
    KIND: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: dK, dV of ``BLOCK_N`` keys, over the query blocks of the transposed layout.
    Grid ``(cdiv(N, BLOCK_N), B * H)``; every key row is written (zeros where unvisited)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_valid = offs_k < N
    d_valid = offs_d < HEAD_DIM
    kv_mask = k_valid[:, None] & d_valid[None, :]
    k = _operand(tl.load(_tile(K, b, h, offs_k, offs_d, stride_kb, stride_kh, stride_kn),
                         mask=kv_mask, other=0.0), UPCAST)
    v = _operand(tl.load(_tile(V, b, h, offs_k, offs_d, stride_vb, stride_vh, stride_vn),
                         mask=kv_mask, other=0.0), UPCAST)
    k_pos = tl.load(POS + offs_k, mask=k_valid, other=0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = tl.load(T_ROW_PTR + pid_n)
    end = tl.load(T_ROW_PTR + pid_n + 1)
    for idx in range(start, end):
        mb = tl.load(T_COL_IDX + idx)
        full = tl.load(T_FULL + idx)
        offs_m = mb * BLOCK_M + offs_m0
        q_valid = offs_m < N
        qd_mask = q_valid[:, None] & d_valid[None, :]
        q = tl.load(_tile(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn),
                    mask=qd_mask, other=0.0)
        do = tl.load(_tile(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don),
                     mask=qd_mask, other=0.0)
        q = _operand(q, UPCAST)
        do = _operand(do, UPCAST)
        lse = tl.load(LSE + pid_bh * N + offs_m, mask=q_valid, other=0.0)
        delta = tl.load(DELTA + pid_bh * N + offs_m, mask=q_valid, other=0.0)
        q_pos = tl.load(POS + offs_m, mask=q_valid, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N]
        s = _masked_scores(s, full, q_pos, k_pos, q_valid, k_valid, KPM + b * stride_kpm + offs_k,
                           text_len, fmap, reach, dilation, sparse_block, local_blocks, KIND, HAS_KPM)
        p = tl.math.exp2(s - lse[:, None])  # [M, N], the forward's probabilities
        p_op = _operand(p.to(DO.dtype.element_ty), UPCAST)
        dv += tl.dot(tl.trans(p_op), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [M, N]
        ds = p * (dp - delta[:, None])
        ds_op = _operand(ds.to(Q.dtype.element_ty), UPCAST)
        dk += tl.dot(tl.trans(ds_op), q, input_precision=PRECISION)
    dk = dk * softmax_scale
    tl.store(_tile(DK, b, h, offs_k, offs_d, stride_dkb, stride_dkh, stride_dkn),
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile(DV, b, h, offs_k, offs_d, stride_dvb, stride_dvh, stride_dvn),
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def attention_backward_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPM, POS, ROW_PTR, COL_IDX, COL_FULL,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn, stride_kpm,
    H, N, HEAD_DIM, qk_scale, softmax_scale,
    text_len, fmap, reach, dilation, sparse_block, local_blocks,
    KIND: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: dQ of ``BLOCK_M`` queries over the key blocks of the forward layout."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_valid = offs_m < N
    d_valid = offs_d < HEAD_DIM
    qd_mask = q_valid[:, None] & d_valid[None, :]
    q = _operand(tl.load(_tile(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn),
                         mask=qd_mask, other=0.0), UPCAST)
    do = _operand(tl.load(_tile(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don),
                          mask=qd_mask, other=0.0), UPCAST)
    lse = tl.load(LSE + pid_bh * N + offs_m, mask=q_valid, other=0.0)
    delta = tl.load(DELTA + pid_bh * N + offs_m, mask=q_valid, other=0.0)
    q_pos = tl.load(POS + offs_m, mask=q_valid, other=0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = tl.load(ROW_PTR + pid_m)
    end = tl.load(ROW_PTR + pid_m + 1)
    for idx in range(start, end):
        kb = tl.load(COL_IDX + idx)
        full = tl.load(COL_FULL + idx)
        offs_k = kb * BLOCK_N + offs_n
        k_valid = offs_k < N
        kv_mask = k_valid[:, None] & d_valid[None, :]
        k = _operand(tl.load(_tile(K, b, h, offs_k, offs_d, stride_kb, stride_kh, stride_kn),
                             mask=kv_mask, other=0.0), UPCAST)
        v = _operand(tl.load(_tile(V, b, h, offs_k, offs_d, stride_vb, stride_vh, stride_vn),
                             mask=kv_mask, other=0.0), UPCAST)
        k_pos = tl.load(POS + offs_k, mask=k_valid, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = _masked_scores(s, full, q_pos, k_pos, q_valid, k_valid, KPM + b * stride_kpm + offs_k,
                           text_len, fmap, reach, dilation, sparse_block, local_blocks, KIND, HAS_KPM)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        ds_op = _operand(ds.to(Q.dtype.element_ty), UPCAST)
        dq += tl.dot(ds_op, k, input_precision=PRECISION)
    dq = dq * softmax_scale
    tl.store(_tile(DQ, b, h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqn),
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def decode_kernel(
    Q, K, V, OUT, KPM, ROW_PTR, COL_IDX, COL_FULL,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on, stride_kpm,
    H, N_K, q_offset, HEAD_DIM, qk_scale,
    text_len, fmap, reach, dilation, sparse_block, local_blocks,
    KIND: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: one query row at position ``q_offset + i`` over ``N_K`` cached keys, using
    that position's row of the per-position layout. Grid ``(n_q, B * H)``; no matmul units
    (a single row is bound by reading the keys), fp32 arithmetic."""
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_pos = q_offset + i
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + i * stride_qn + offs_d, mask=d_valid, other=0.0)
    q = q.to(tl.float32) * qk_scale  # [D]

    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)  # scalar running max
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    start = tl.load(ROW_PTR + q_pos)
    end = tl.load(ROW_PTR + q_pos + 1)
    for idx in range(start, end):
        kb = tl.load(COL_IDX + idx)
        full = tl.load(COL_FULL + idx)
        offs_k = kb * BLOCK_N + offs_n
        k_valid = offs_k < N_K
        kv_mask = k_valid[:, None] & d_valid[None, :]
        k = tl.load(_tile(K, b, h, offs_k, offs_d, stride_kb, stride_kh, stride_kn),
                    mask=kv_mask, other=0.0)
        v = tl.load(_tile(V, b, h, offs_k, offs_d, stride_vb, stride_vh, stride_vn),
                    mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)  # [N]
        if full == 0:  # a full tile lies at or before q_pos, so inside the N_K >= q_pos + 1 keys
            ok = _allowed(q_pos, offs_k, text_len, fmap, reach, dilation, sparse_block,
                          local_blocks, KIND)
            s = tl.where(ok & k_valid, s, float("-inf"))
        if HAS_KPM:
            keep = tl.load(KPM + b * stride_kpm + offs_k, mask=k_valid, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe)  # [N]
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(OUT + b * stride_ob + h * stride_oh + i * stride_on + offs_d, out.to(OUT.dtype.element_ty),
             mask=d_valid)
