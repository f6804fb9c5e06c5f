"""`AttentionPattern` on its own: the rule on index tensors, the size checks, the dense masks.

The conformance suite checks masks through the kernels; here `allowed` is called directly on
position tensors, as FlexAttention's mask function calls it (mutation runs deselect the Flex
tests), and compared with the brute-force reference of `dalle_core.testing`, with a few sparse
cases worked out by hand. Bad sizes must fail at construction with messages naming the cause.
"""

from __future__ import annotations

import re

import pytest
import torch

from dalle_core.attention.patterns import PATTERNS, AttentionPattern
from dalle_core.testing import AttentionKernelConformance, brute_force_allowed, brute_force_mask

#: the conformance suite's layouts: a 4 x 4 grid after 5 text positions (sparse blocks of 4,
#: 2 local) and one after 4 (dilated 5 x 5 window, sparse blocks of 3, 3 local)
LAYOUTS = AttentionKernelConformance.layouts


def reference(pattern: AttentionPattern, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[len(queries), len(keys)]`` from `brute_force_allowed`, one pair at a time."""
    rows = [[brute_force_allowed(pattern, q, k) for k in keys.tolist()] for q in queries.tolist()]
    return torch.tensor(rows, dtype=torch.bool).reshape(len(queries), len(keys))


# the rule


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["blocks4", "blocks3-dilated"])
@pytest.mark.parametrize("kind", PATTERNS)
def test_allowed_on_index_tensors_follows_the_rules(kind, layout, dtype):
    """`allowed` on broadcast position tensors (FlexAttention passes int32) == brute force."""
    pattern = AttentionPattern(kind, **layout)
    positions = torch.arange(pattern.seq_len, dtype=dtype)  # [N], N = 20 or 19
    mask = pattern.allowed(positions[:, None], positions[None, :])  # [N, 1] x [1, N] -> [N, N]
    assert mask.dtype == torch.bool
    assert torch.equal(mask, brute_force_mask(pattern))
    # one query against every key: [1] x [N] -> [N]
    last = pattern.seq_len - 1
    row = pattern.allowed(positions[last : last + 1], positions)
    assert torch.equal(row, brute_force_mask(pattern)[last])


def test_sparse_blocks_by_hand():
    """The query's block and the ``num_local_blocks - 1`` before it, plus all text, causally."""
    # text_len 2 (positions 0, 1), a 3 x 3 grid (2 .. 10), seq_len 10; blocks of 3 positions:
    # [0 1 2] [3 4 5] [6 7 8] [9]
    pattern = AttentionPattern("sparse", text_len=2, fmap_size=3, block_size=3, num_local_blocks=2)
    expected = {  # query: keys 0 .. 9 (1 = may attend)
        1: [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # text: earlier text only
        4: [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # block 1: blocks 0 and 1
        7: [1, 1, 0, 1, 1, 1, 1, 1, 0, 0],  # block 2: text, blocks 1 and 2, not code 2 in block 0
        9: [1, 1, 0, 0, 0, 0, 1, 1, 1, 1],  # block 3: text, blocks 2 and 3
    }
    mask = pattern.dense_mask(pattern.seq_len, pattern.seq_len)  # [10, 10]
    for query, row in expected.items():
        assert mask[query].int().tolist() == row, f"query {query}"
        assert brute_force_mask(pattern, 1, 10, q_offset=query)[0].int().tolist() == row
    one_block = AttentionPattern("sparse", text_len=2, fmap_size=3, block_size=3, num_local_blocks=1)
    assert one_block.dense_mask(1, 10, q_offset=7)[0].int().tolist() == [1, 1, 0, 0, 0, 0, 1, 1, 0, 0]


def test_conv_windows_by_hand():
    """``conv_like`` keeps the earlier half of the window centred on the query;
    ``conv_like_trailing`` the whole window whose last cell is the query (upstream's)."""
    # text_len 1 (position 0), a 4 x 4 grid (1 .. 16), kernel 3; query: code (2, 2) = position 11
    grid = {(row, col): 1 + 4 * row + col for row in range(4) for col in range(4)}
    expected = {
        "conv_like": {(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)},
        "conv_like_trailing": {(1, 1), (1, 2), (2, 1), (2, 2), (0, 0), (0, 1), (0, 2), (1, 0), (2, 0)},
    }
    for kind, cells in expected.items():
        pattern = AttentionPattern(kind, text_len=1, fmap_size=4, kernel_size=3)
        row = pattern.dense_mask(1, pattern.seq_len, q_offset=grid[2, 2])[0]  # [16]
        allowed_cells = {cell for cell, position in grid.items() if position < 16 and row[position]}
        assert row[0] and allowed_cells == cells, kind
    dilated = AttentionPattern("conv_like_trailing", text_len=1, fmap_size=4, kernel_size=3, dilation=2)
    row = dilated.dense_mask(1, dilated.seq_len, q_offset=grid[2, 2])[0]
    assert {cell for cell, position in grid.items() if position < 16 and row[position]} == {
        (0, 0), (0, 2), (2, 0), (2, 2)
    }


def test_allowed_is_exact_past_float32_integers():
    """Integer arithmetic at any position: float32 (what ``/`` on index tensors gives) is exact
    only up to 2**24, and a 4097 x 4097 grid already goes past it."""
    # sparse, default blocks (16 positions, 4 local): queries around 2**24, keys up to 7 blocks back
    sparse = AttentionPattern("sparse", text_len=1, fmap_size=4097)  # seq_len 16_785_409
    for dtype in (torch.int64, torch.int32):
        queries = torch.arange(2**24 - 32, 2**24 + 32, dtype=dtype)  # [64]
        keys = torch.arange(2**24 - 144, 2**24 + 32, dtype=dtype)  # [176]
        mask = sparse.allowed(queries[:, None], keys[None, :])  # [64, 176]
        assert torch.equal(mask, reference(sparse, queries, keys)), dtype
    # conv_like whose window reaches 2**24 rows (kernel 2**25 + 1): a key 2**24 + 1 rows up is out
    rows = 2**24 + 2
    conv = AttentionPattern("conv_like", text_len=1, fmap_size=rows, kernel_size=2**25 + 1)
    query = 1 + rows * (rows - 1)  # last row, column 0 (about 2.8e14: int64)
    keys = torch.tensor([1 + rows * row + col for row in (0, 1, 2) for col in (0, 1)])  # [6]
    mask = conv.allowed(torch.tensor([query])[:, None], keys[None, :])  # [1, 6]
    assert mask.tolist() == [[False, False, True, True, True, True]]
    assert torch.equal(mask, reference(conv, torch.tensor([query]), keys))


# construction


@pytest.mark.parametrize(
    ("kind", "sizes", "message"),
    [
        (
            "axial",
            {},
            "unknown attention pattern 'axial'; "
            "valid patterns are full, axial_row, axial_col, conv_like, conv_like_trailing, sparse",
        ),
        ("full", {"text_len": 0}, "text_len (0) and fmap_size (4) must be positive"),
        ("full", {"fmap_size": 0}, "text_len (3) and fmap_size (0) must be positive"),
        ("conv_like", {"kernel_size": 4}, "conv_like kernel_size must be odd and positive, got 4"),
        ("conv_like", {"kernel_size": 0}, "conv_like kernel_size must be odd and positive, got 0"),
        ("conv_like", {"kernel_size": -3}, "conv_like kernel_size must be odd and positive, got -3"),
        ("conv_like", {"dilation": 0}, "dilation, block_size and num_local_blocks must be positive"),
        ("sparse", {"block_size": 0}, "dilation, block_size and num_local_blocks must be positive"),
        ("sparse", {"num_local_blocks": 0}, "dilation, block_size and num_local_blocks must be positive"),
    ],
)
def test_bad_sizes_are_rejected(kind, sizes, message):
    """Each bad size on its own (the others valid) raises a `ValueError` naming it, exactly."""
    layout = {"text_len": 3, "fmap_size": 4, **sizes}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        AttentionPattern(kind, **layout)


def test_smallest_sizes_are_accepted():
    """1 is positive and odd: a 1 x 1 window, blocks of one position, one local block."""
    pattern = AttentionPattern("conv_like", 1, 1, kernel_size=1, dilation=1, block_size=1, num_local_blocks=1)
    assert pattern.seq_len == 1


# lengths


PATTERN_3X3 = AttentionPattern("full", text_len=3, fmap_size=3)  # seq_len 3 + 9 - 1 = 11


@pytest.mark.parametrize(
    ("n_q", "n_k", "q_offset"),
    [(11, 11, 0), (1, 11, 10), (1, 1, 0), (5, 8, 3)],
)
def test_check_length_accepts_the_sequence(n_q, n_k, q_offset):
    """Queries up to position 10 and up to 11 keys fit."""
    PATTERN_3X3.check_length(n_q, n_k, q_offset)


def test_check_length_counts_queries_from_position_zero_by_default():
    """Without ``q_offset`` the queries start at position 0."""
    PATTERN_3X3.check_length(11, 11)  # the whole sequence
    with pytest.raises(ValueError):
        PATTERN_3X3.check_length(12, 11)


@pytest.mark.parametrize(
    ("n_q", "n_k", "q_offset", "longest"),
    [
        (12, 11, 0, 12),  # one query too many
        (2, 11, 10, 12),  # queries at 10 and 11
        (1, 11, 11, 12),  # a query at 11
        (1, 13, 0, 13),  # two keys too many
        (6, 5, 7, 13),  # queries at 7 .. 12 over few keys
    ],
)
def test_check_length_rejects_positions_past_the_sequence(n_q, n_k, q_offset, longest):
    """The message gives the longest reach (last query + 1 or the key count) and the pattern's."""
    message = (
        f"sequence of {longest} positions is longer than the pattern's 11 (text_len 3 + 9 image codes - 1)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PATTERN_3X3.check_length(n_q, n_k, q_offset)


@pytest.mark.parametrize(
    ("n_q", "n_k", "q_offset"),
    [(12, 11, 0), (2, 3, 10), (1, 12, 0), (1, 12, 10), (2, 11, 10)],
)
def test_dense_mask_rejects_positions_past_the_sequence(n_q, n_k, q_offset):
    """No silently short slice: out-of-range queries or keys raise before slicing."""
    with pytest.raises(ValueError, match="longer than the pattern's 11"):
        PATTERN_3X3.dense_mask(n_q, n_k, q_offset)


@pytest.mark.parametrize("kind", PATTERNS)
def test_dense_mask_slices(kind):
    """``[n_q, n_k]`` slices of the whole mask: decode steps, prefixes, a block of queries."""
    pattern = AttentionPattern(kind, text_len=3, fmap_size=3, kernel_size=3, block_size=2, num_local_blocks=2)
    for n_q, n_k, q_offset in [(11, 11, 0), (1, 11, 10), (1, 4, 3), (4, 9, 5), (2, 3, 0)]:
        mask = pattern.dense_mask(n_q, n_k, q_offset)
        assert mask.shape == (n_q, n_k)
        assert torch.equal(mask, brute_force_mask(pattern, n_q, n_k, q_offset=q_offset))


def test_dense_mask_on_the_requested_device():
    """Built on the device asked for (``meta`` here: any non-default device) and reused."""
    pattern = AttentionPattern("axial_row", text_len=3, fmap_size=3)
    for device in ("meta", torch.device("meta")):
        mask = pattern.dense_mask(11, 11, device=device)  # [11, 11]
        assert mask.device.type == "meta" and mask.shape == (11, 11) and mask.dtype == torch.bool
    first, again = pattern.dense_mask(11, 11), pattern.dense_mask(1, 11, q_offset=10)
    assert first.device.type == "cpu"
    assert first.untyped_storage().data_ptr() == again.untyped_storage().data_ptr()  # built once
