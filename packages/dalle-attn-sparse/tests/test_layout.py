"""Block layouts agree with the pattern rule, tile by tile (no triton needed)."""

from __future__ import annotations

import pytest
import torch

from dalle_attn_sparse.layout import (
    attention_layout,
    build_layout,
    decode_layout,
    inverse_order,
    sequence_order,
)
from dalle_core.attention.patterns import PATTERNS, AttentionPattern
from dalle_core.testing import brute_force_mask

LAYOUTS = [
    dict(text_len=5, fmap_size=4, kernel_size=3, block_size=4, num_local_blocks=2),
    dict(text_len=7, fmap_size=6, kernel_size=5, dilation=2, block_size=3, num_local_blocks=3),
]


def tiles_from_mask(mask: torch.Tensor, block_m: int, block_n: int):
    """(visited, full) per tile of a boolean ``[n_q, n_k]`` mask, padding never allowed."""
    n_q, n_k = mask.shape
    rows, cols = -(-n_q // block_m), -(-n_k // block_n)
    padded = torch.zeros(rows * block_m, cols * block_n, dtype=torch.bool)
    padded[:n_q, :n_k] = mask
    tiles = padded.view(rows, block_m, cols, block_n)
    return tiles.any(3).any(1), tiles.all(3).all(1)


def dense_tiles(row_ptr, col_idx, full, rows, cols):
    visited = torch.zeros(rows, cols, dtype=torch.bool)
    is_full = torch.zeros(rows, cols, dtype=torch.bool)
    for row in range(rows):
        start, end = int(row_ptr[row]), int(row_ptr[row + 1])
        cols_here = col_idx[start:end].long()
        assert torch.all(cols_here[1:] > cols_here[:-1]), "key blocks ascend within a row"
        visited[row, cols_here] = True
        is_full[row, cols_here] = full[start:end].bool()
    return visited, is_full


@pytest.mark.parametrize("kind", PATTERNS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["small", "dilated"])
@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16), (1, 16)])
def test_layout_tiles_match_the_brute_force_mask(kind, layout, blocks):
    pattern = AttentionPattern(kind, **layout)
    block_m, block_n = blocks
    for n in (pattern.seq_len, pattern.seq_len // 2 + 1):
        order = sequence_order(pattern, n, torch.device("cpu"))
        order = torch.arange(n) if order is None else order
        mask = brute_force_mask(pattern, n, n)[order][:, order]  # in the kernel's order
        expected_visited, expected_full = tiles_from_mask(mask, block_m, block_n)
        built = build_layout(pattern, order, order, block_m, block_n)
        rows, cols = expected_visited.shape
        visited, full = dense_tiles(built.row_ptr, built.col_idx, built.full, rows, cols)
        assert torch.equal(visited, expected_visited)
        assert torch.equal(full, expected_full & expected_visited)
        t_visited, t_full = dense_tiles(built.t_row_ptr, built.t_col_idx, built.t_full, cols, rows)
        assert torch.equal(t_visited, visited.t()) and torch.equal(t_full, full.t())


def test_axial_col_order_is_column_major_and_inverts():
    pattern = AttentionPattern("axial_col", text_len=2, fmap_size=3)
    n = pattern.seq_len  # 10: the last code is never input
    order = sequence_order(pattern, n, torch.device("cpu"))
    assert order.tolist() == [0, 1, 2, 5, 8, 3, 6, 9, 4, 7]
    assert torch.equal(order[inverse_order(pattern, n, torch.device("cpu"))], torch.arange(n))
    assert sequence_order(AttentionPattern("axial_row", 2, 3), n, torch.device("cpu")) is None


def test_image_patterns_skip_most_tiles_at_dalle_scale():
    """At 256 text + 64 x 64 codes with 64-wide tiles, the image patterns visit far fewer tiles
    than causal attention (the source of their speed)."""
    density = {
        kind: attention_layout(AttentionPattern(kind, 257, 64), 4352, 64, 64, torch.device("cpu")).density
        for kind in PATTERNS
    }
    assert 0.5 < density["full"] < 0.52
    for kind in ("axial_row", "axial_col", "conv_like", "sparse"):
        assert density[kind] < density["full"] / 3, density


def test_decode_layout_has_a_row_per_position():
    pattern = AttentionPattern("conv_like", text_len=3, fmap_size=4)
    built = decode_layout(pattern, 16, torch.device("cpu"))
    assert built.n_row_blocks == pattern.seq_len and built.block_m == 1


def test_too_long_a_sequence_is_a_clear_error():
    pattern = AttentionPattern("full", text_len=3, fmap_size=2)
    with pytest.raises(ValueError, match="longer than the pattern's 6"):
        attention_layout(pattern, 7, 16, 16, torch.device("cpu"))
