"""Test setup: Triton's CPU interpreter, one thread, a fresh but reproducible seed per test.

``TRITON_INTERPRET=1`` must be set before triton is imported, so it is set here (unless the
environment already sets it). Kernel tests run on CPU tensors in the interpreter; the tests
marked ``gpu`` need a CUDA device and the compiled kernels: ``TRITON_INTERPRET=0 pytest -m gpu``.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

from dalle_attn_sparse.kernel import interpreting  # noqa: E402

requires_interpreter = pytest.mark.skipif(
    not interpreting(), reason="runs the kernels on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)"
)
requires_compiled_cuda = pytest.mark.skipif(
    interpreting() or not torch.cuda.is_available(),
    reason="needs a CUDA device and compiled kernels (TRITON_INTERPRET=0)",
)


@pytest.fixture(autouse=True)
def _single_thread_and_seed(request: pytest.FixtureRequest):
    """One thread; each test draws its own random inputs from a seed derived from its id."""
    torch.set_num_threads(1)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
