"""`TritonSparseKernel`: the ``triton`` attention kernel that ``attn_kernel="auto"`` picks on a GPU.

Importing this module does not import triton: the kernels are loaded on the first call, so the
plugin lists itself (as unusable, "triton not installed") on a machine without triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dalle_core.attention.kernels import AttentionKernel, SDPAKernel
from dalle_core.attention.patterns import PATTERNS

#: largest head dim the kernels take (smaller ones are padded to a power of two inside)
MAX_HEAD_DIM = 128


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of the kernels (``num_warps=None``: by head dim)."""

    block_m: int = 64
    block_n: int = 64
    decode_block_n: int = 64
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "decode_block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {value}")

    def warps(self, head_dim: int) -> int:
        """Warps per program: ``num_warps``, or 4 up to head dim 64 and 8 above."""
        if self.num_warps is not None:
            return self.num_warps
        return 4 if head_dim <= 64 else 8


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "yes", "on"}


class TritonSparseKernel(AttentionKernel):
    """Block-sparse causal attention in Triton: forward and backward for every DALL-E pattern,
    and cached generation steps (forward) through a per-position layout.

    Serves CUDA tensors, and CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's
    interpreter, for tests), in fp32 / fp16 / bf16. Any other call (a CPU tensor outside the
    interpreter, float64, a head dim above 128, a cached step that needs gradients) goes to the
    dense SDPA kernel with the pattern's mask, so a direct call is always correct.

    ``block_m`` / ``block_n``: query / key tile sizes of the full-sequence kernels;
    ``decode_block_n``: key tile of the decode kernel (powers of two, at least 16);
    ``num_warps``: None picks 4 for head dims up to 64 and 8 above.
    """

    name = "triton"
    patterns = frozenset(PATTERNS)
    devices = frozenset({"cuda", "cpu"})
    dtypes = frozenset({torch.float32, torch.float16, torch.bfloat16})

    def __init__(
        self, block_m: int = 64, block_n: int = 64, decode_block_n: int = 64,
        num_warps: int | None = None, num_stages: int = 2,
    ):
        self.config = LaunchConfig(block_m, block_n, decode_block_n, num_warps, num_stages)
        self._dense = SDPAKernel()

    def supports(self, pattern, device_type, dtype, needs_grad, decoding):
        """Any pattern on CUDA (or on the CPU under ``TRITON_INTERPRET=1``) in fp32 / fp16 /
        bf16; cached generation steps (``decoding``) without gradients only."""
        if device_type == "cpu" and not interpreting():
            return False
        if decoding and needs_grad:
            return False
        return super().supports(pattern, device_type, dtype, needs_grad, decoding)

    def priority(self, pattern: str, device_type: str) -> int:
        """Above SDPA (10) and FlexAttention (5) for the sparse image patterns on CUDA; below
        dense flash SDPA for ``full``, whose causal layout has nothing to skip."""
        if device_type != "cuda":
            return 0
        return 2 if pattern == "full" else 20

    def __call__(self, q, k, v, pattern, *, q_offset=0, key_padding_mask=None):
        decoding = q_offset > 0 or q.shape[-2] != k.shape[-2]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        usable = self.supports(pattern.kind, q.device.type, q.dtype, needs_grad, decoding)
        if not usable or q.shape[-1] > MAX_HEAD_DIM:
            return self._dense(q, k, v, pattern, q_offset=q_offset, key_padding_mask=key_padding_mask)
        from dalle_attn_sparse.ops import sparse_attention, sparse_decode

        if decoding:
            return sparse_decode(q, k, v, pattern, q_offset, key_padding_mask, self.config)
        return sparse_attention(q, k, v, pattern, key_padding_mask, self.config)
