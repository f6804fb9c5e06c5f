"""dalle-core's attention-kernel conformance suite, run on the ``triton`` kernel.

Both with the kernel as ``attn_kernel="triton"`` builds it (default tiles): in Triton's CPU
interpreter (``TRITON_INTERPRET=1``) in fp32, and on a GPU (``-m gpu``, ``TRITON_INTERPRET=0``)
in fp32, fp16 and bf16. Several tiles per sequence are tested in test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_compiled_cuda, requires_interpreter

from dalle_attn_sparse import TritonSparseKernel
from dalle_core.testing import AttentionKernelConformance


@requires_interpreter
class TestTritonKernelInInterpreter(AttentionKernelConformance):
    device = "cpu"
    dtypes = (torch.float32,)

    def make_kernel(self):
        return TritonSparseKernel()


@pytest.mark.gpu
@requires_compiled_cuda
class TestTritonKernelOnGPU(AttentionKernelConformance):
    device = "cuda"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def make_kernel(self):
        return TritonSparseKernel()
