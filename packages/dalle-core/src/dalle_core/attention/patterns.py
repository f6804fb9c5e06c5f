"""Which key each query may attend to, for every DALL-E attention pattern.

The sequence a DALL-E transformer sees is ``[bos, text..., image codes...]``: positions
``0 .. text_len - 1`` are text (``text_len = text_seq_len + 1`` with the bos), position
``text_len + j`` holds image code ``j`` of a ``fmap_size x fmap_size`` grid, row-major.

Rules (True = may attend), always causal (key position <= query position):

- text queries attend to every earlier text position;
- image queries attend to all text and, per pattern, to earlier image codes:
  ``full`` all of them; ``axial_row`` those in the same row; ``axial_col`` those in the same
  column; ``conv_like`` those in the ``kernel_size x kernel_size`` window (with ``dilation``)
  centred on the query; ``conv_like_trailing`` those in the window that ends at the query
  (rows and columns ``-(kernel_size - 1) * dilation .. 0`` of it: the upstream dalle-pytorch
  ``conv_like``, which sees 25 earlier codes of a 5 x 5 kernel where the centred window
  leaves 13); ``sparse`` those in the query's block and the ``num_local_blocks - 1``
  blocks before it (blocks of ``block_size`` sequence positions), the block-sparse layout of
  DeepSpeed's variable sparsity with the text as global blocks.

`AttentionPattern.allowed` states the rule once, elementwise on position tensors, so the same
code builds dense boolean masks, FlexAttention block masks and references for fused kernels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

PATTERNS = ("full", "axial_row", "axial_col", "conv_like", "conv_like_trailing", "sparse")


@dataclass(frozen=True)
class AttentionPattern:
    """One layer's attention pattern over a ``[bos, text, image]`` sequence."""

    kind: str
    text_len: int
    fmap_size: int
    kernel_size: int = 5
    dilation: int = 1
    block_size: int = 16
    num_local_blocks: int = 4

    def __post_init__(self) -> None:
        if self.kind not in PATTERNS:
            raise ValueError(
                f"unknown attention pattern '{self.kind}'; valid patterns are {', '.join(PATTERNS)}"
            )
        if self.text_len < 1 or self.fmap_size < 1:
            raise ValueError(
                f"text_len ({self.text_len}) and fmap_size ({self.fmap_size}) must be positive"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"conv_like kernel_size must be odd and positive, got {self.kernel_size}")
        if self.dilation < 1 or self.block_size < 1 or self.num_local_blocks < 1:
            raise ValueError("dilation, block_size and num_local_blocks must be positive")

    @property
    def image_len(self) -> int:
        """Number of image codes in the grid."""
        return self.fmap_size**2

    @property
    def seq_len(self) -> int:
        """Longest sequence the transformer sees (the last code is predicted, never input)."""
        return self.text_len + self.image_len - 1

    def allowed(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """Elementwise rule on broadcastable position tensors -> bool tensor (True = attend)."""
        causal = kv_idx <= q_idx
        if self.kind == "full":
            return causal
        f = self.fmap_size
        q_img, kv_img = q_idx - self.text_len, kv_idx - self.text_len
        q_row, q_col = q_img // f, q_img % f
        kv_row, kv_col = kv_img // f, kv_img % f
        if self.kind == "axial_row":
            image_rule = q_row == kv_row
        elif self.kind == "axial_col":
            image_rule = q_col == kv_col
        elif self.kind in ("conv_like", "conv_like_trailing"):
            reach = (self.kernel_size // 2) * self.dilation
            d_row, d_col = kv_row - q_row, kv_col - q_col
            if self.kind == "conv_like_trailing":  # the window's last cell is the query
                d_row, d_col = d_row + reach, d_col + reach
            image_rule = (
                (d_row.abs() <= reach)
                & (d_col.abs() <= reach)
                & (d_row % self.dilation == 0)
                & (d_col % self.dilation == 0)
            )
        else:  # sparse
            image_rule = kv_idx // self.block_size > q_idx // self.block_size - self.num_local_blocks
        return causal & ((kv_idx < self.text_len) | image_rule)

    def check_length(self, n_q: int, n_k: int, q_offset: int = 0) -> None:
        """A `ValueError` when queries at ``q_offset .. q_offset + n_q - 1`` or ``n_k`` keys
        reach past the pattern's sequence."""
        if q_offset + n_q > self.seq_len or n_k > self.seq_len:
            raise ValueError(
                f"sequence of {max(q_offset + n_q, n_k)} positions is longer than the pattern's "
                f"{self.seq_len} (text_len {self.text_len} + {self.image_len} image codes - 1)"
            )

    def dense_mask(self, n_q: int, n_k: int, q_offset: int = 0, device: torch.device | str = "cpu") -> Tensor:
        """Boolean mask ``[n_q, n_k]`` for queries at ``q_offset ..`` over keys ``0 .. n_k - 1``.

        Built once per pattern and device for the whole sequence and sliced, so generation
        steps never rebuild it.
        """
        self.check_length(n_q, n_k, q_offset)
        full = _full_mask(self, torch.device(device))
        return full[q_offset : q_offset + n_q, :n_k]


@functools.lru_cache(maxsize=64)
def _full_mask(pattern: AttentionPattern, device: torch.device) -> Tensor:
    positions = torch.arange(pattern.seq_len, device=device)
    return pattern.allowed(positions[:, None], positions[None, :])  # [N, N]
