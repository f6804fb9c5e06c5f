"""dalle plugin: registers the ``triton`` attention kernel (entry point ``dalle_attn_sparse``)."""

from __future__ import annotations

from dalle_attn_sparse.kernel import TritonSparseKernel
from dalle_core import hookimpl
from dalle_core.hookspecs import Register


@hookimpl
def dalle_register_attention(register: Register) -> None:
    register(
        TritonSparseKernel.name,
        TritonSparseKernel,
        requires=("triton",),
        description="Triton block-sparse kernels for every pattern (forward, backward, decode)",
    )
