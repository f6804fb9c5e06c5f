"""Block layouts: which key blocks each query block visits, built from `AttentionPattern.allowed`.

A layout is the pattern's ``[N, N]`` mask reduced to tiles of ``block_m`` queries by
``block_n`` keys and stored as compressed rows (CSR), so a kernel program walks only the tiles
it needs:

- ``row_ptr [n_row_blocks + 1]``, ``col_idx [nnz]``: the key blocks of query block ``m`` are
  ``col_idx[row_ptr[m] : row_ptr[m + 1]]``, ascending (forward pass and dQ);
- ``t_row_ptr``, ``t_col_idx``: the same tiles transposed, the query blocks of each key block
  (dK / dV);
- ``full`` / ``t_full`` (int8, aligned with ``col_idx`` / ``t_col_idx``): 1 where every element
  of the tile is allowed and in range, so the kernel skips the element mask there.

The sequence may be permuted before attention (`sequence_order`): ``axial_col`` runs with the
image codes in column-major order, so that the keys a column sees sit in a few contiguous
blocks; the mask is always computed from the original positions. Layouts are cached per
(pattern, length, block sizes, order, device).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from dalle_core.attention.patterns import AttentionPattern

#: patterns whose image codes the kernel visits in column-major order
COLUMN_MAJOR_PATTERNS = frozenset({"axial_col"})


@dataclass(frozen=True)
class BlockLayout:
    """The tiles of one (pattern, sequence) a block-sparse kernel visits; see the module doc."""

    block_m: int
    block_n: int
    n_q: int
    n_k: int
    row_ptr: Tensor  # int32 [cdiv(n_q, block_m) + 1]
    col_idx: Tensor  # int32 [nnz]
    full: Tensor  # int8 [nnz]
    t_row_ptr: Tensor  # int32 [cdiv(n_k, block_n) + 1]
    t_col_idx: Tensor  # int32 [nnz]
    t_full: Tensor  # int8 [nnz]

    @property
    def n_row_blocks(self) -> int:
        """Number of query tiles (rows of the layout)."""
        return self.row_ptr.numel() - 1

    @property
    def n_col_blocks(self) -> int:
        """Number of key tiles (columns of the layout)."""
        return self.t_row_ptr.numel() - 1

    @property
    def density(self) -> float:
        """Visited tiles over all tiles (1.0: dense; a causal layout is about 0.5)."""
        return self.col_idx.numel() / max(1, self.n_row_blocks * self.n_col_blocks)


@functools.lru_cache(maxsize=64)
def sequence_order(pattern: AttentionPattern, n: int, device: torch.device) -> Tensor | None:
    """Original positions in the order the kernel visits them (int64 ``[n]``), or None for the
    identity. For ``axial_col``: the text, then the image codes column by column."""
    if pattern.kind not in COLUMN_MAJOR_PATTERNS:
        return None
    f, text_len = pattern.fmap_size, pattern.text_len
    slot = torch.arange(pattern.image_len, device=device)
    image = text_len + (slot % f) * f + slot // f  # column-major walk of the grid
    order = torch.cat((torch.arange(min(n, text_len), device=device), image[image < n]))
    return order  # [n]


@functools.lru_cache(maxsize=64)
def inverse_order(pattern: AttentionPattern, n: int, device: torch.device) -> Tensor | None:
    """``inverse[position] = slot``: undoes `sequence_order`."""
    order = sequence_order(pattern, n, device)
    return None if order is None else torch.argsort(order)


@functools.lru_cache(maxsize=64)
def attention_layout(
    pattern: AttentionPattern, n: int, block_m: int, block_n: int, device: torch.device
) -> BlockLayout:
    """Layout of full-sequence attention (``n`` queries over the same ``n`` keys, from position
    0) in the kernel's order (`sequence_order`)."""
    pattern.check_length(n, n)
    order = sequence_order(pattern, n, device)
    positions = torch.arange(n, device=device) if order is None else order
    return build_layout(pattern, positions, positions, block_m, block_n)


@functools.lru_cache(maxsize=16)
def decode_layout(pattern: AttentionPattern, block_n: int, device: torch.device) -> BlockLayout:
    """Per-position layout for cached generation: row ``p`` lists the key blocks that the query
    at sequence position ``p`` visits (``block_m = 1`` over the whole sequence, built once)."""
    positions = torch.arange(pattern.seq_len, device=device)
    return build_layout(pattern, positions, positions, 1, block_n)


def build_layout(
    pattern: AttentionPattern, q_positions: Tensor, k_positions: Tensor, block_m: int, block_n: int
) -> BlockLayout:
    """Reduce ``pattern.allowed(q_positions, k_positions)`` to tiles; see `BlockLayout`."""
    n_q, n_k = q_positions.numel(), k_positions.numel()
    rows, cols = -(-n_q // block_m), -(-n_k // block_n)
    q_pos = _padded(q_positions, rows * block_m)  # [rows * block_m], -1 past the end
    k_pos = _padded(k_positions, cols * block_n)
    allowed = pattern.allowed(q_pos[:, None], k_pos[None, :])
    allowed &= (q_pos >= 0)[:, None] & (k_pos >= 0)[None, :]  # padding is never allowed
    tiles = allowed.view(rows, block_m, cols, block_n)
    visited = tiles.any(dim=3).any(dim=1)  # [rows, cols]
    full = tiles.all(dim=3).all(dim=1)  # [rows, cols]; a tile with padding is never full
    t_visited = visited.t().contiguous()
    return BlockLayout(
        block_m,
        block_n,
        n_q,
        n_k,
        *_csr(visited, full),
        *_csr(t_visited, full.t()),
    )


def _padded(positions: Tensor, length: int) -> Tensor:
    out = torch.full((length,), -1, dtype=torch.int64, device=positions.device)
    out[: positions.numel()] = positions
    return out


def _csr(visited: Tensor, full: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Compressed rows of a boolean ``[rows, cols]`` tile matrix, with each tile's full flag."""
    counts = visited.sum(dim=1)
    row_ptr = torch.zeros(visited.shape[0] + 1, dtype=torch.int32, device=visited.device)
    row_ptr[1:] = counts.cumsum(0)
    row, col = visited.nonzero(as_tuple=True)  # row-major: columns ascend within a row
    return row_ptr, col.to(torch.int32), full[row, col].to(torch.int8)
