"""Triton block-sparse attention kernels for DALL-E's attention patterns.

Installing the package registers the ``triton`` attention kernel with dalle-core, so
``DALLE(..., attn_kernel="auto")`` uses it on a GPU. Importing it does not import triton;
`dalle_attn_sparse.ops` (the kernels' launchers) does.
"""

from dalle_attn_sparse.kernel import LaunchConfig, TritonSparseKernel
from dalle_attn_sparse.layout import BlockLayout, attention_layout, build_layout, decode_layout

__all__ = [
    "BlockLayout",
    "LaunchConfig",
    "TritonSparseKernel",
    "attention_layout",
    "build_layout",
    "decode_layout",
]
__version__ = "0.1.0"
