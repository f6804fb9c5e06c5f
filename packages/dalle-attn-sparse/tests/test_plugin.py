"""Registration with dalle-core, and how ``attn_kernel="auto"`` ranks the ``triton`` kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dalle_attn_sparse import TritonSparseKernel
from dalle_core.attention.kernels import SDPAKernel
from dalle_core.attention.patterns import PATTERNS, AttentionPattern
from dalle_core.plugins import create_attention_kernel, registry
from dalle_core.testing import reference_attention
from dalle_core.transformer import KernelSelector

IMAGE_PATTERNS = ("axial_row", "axial_col", "conv_like", "sparse")


def test_registered_under_triton_through_the_entry_point():
    entry = registry("attention")["triton"]
    assert entry.package == "dalle-attn-sparse"
    assert entry.usable() == (True, "")  # triton is a test dependency
    kernel = create_attention_kernel("triton")
    assert isinstance(kernel, TritonSparseKernel)
    assert kernel.patterns == frozenset(PATTERNS)
    assert kernel.dtypes == {torch.float32, torch.float16, torch.bfloat16}


def test_lists_itself_as_unusable_without_triton():
    """Importing the package and building the registry never import triton."""
    script = (
        "import sys; sys.modules['triton'] = None\n"  # import triton now fails, find_spec says None
        "import dalle_attn_sparse\n"
        "from dalle_core.plugins import registry, usable_attention_kernels\n"
        "print(registry('attention')['triton'].usable())\n"
        "print(sorted(kernel.name for kernel in usable_attention_kernels()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["(False, 'triton not installed')", "['flex', 'sdpa']"]


@pytest.mark.parametrize("needs_grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_auto_picks_triton_for_image_patterns_on_cuda(needs_grad, dtype):
    """What ``auto`` would choose on a GPU (the choice needs no CUDA tensor)."""
    selector = KernelSelector("auto", set(PATTERNS))
    for kind in IMAGE_PATTERNS:
        assert isinstance(selector.choose(kind, "cuda", dtype, needs_grad, False), TritonSparseKernel)
    # dense flash SDPA has nothing to skip in the causal layout
    assert isinstance(selector.choose("full", "cuda", dtype, needs_grad, False), SDPAKernel)
    # a cached generation step: triton's decode kernel
    assert isinstance(selector.choose("conv_like", "cuda", dtype, False, True), TritonSparseKernel)


def test_auto_keeps_the_dense_masked_path_on_cpu(monkeypatch):
    selector = KernelSelector("auto", set(PATTERNS))
    for kind in PATTERNS:
        assert isinstance(selector.choose(kind, "cpu", torch.float32, True, False), SDPAKernel)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # outside the interpreter: no CPU support at all
    assert not TritonSparseKernel().supports("axial_row", "cpu", torch.float32, False, False)


@pytest.mark.parametrize(
    "case", ["cpu-outside-interpreter", "float64", "decode-with-grad", "head-dim-256"]
)
def test_calls_it_cannot_serve_take_the_dense_path_and_stay_correct(case, monkeypatch):
    pattern = AttentionPattern("conv_like", text_len=4, fmap_size=4, kernel_size=3)
    n, head_dim, dtype, offset = pattern.seq_len, 16, torch.float32, 0
    if case == "cpu-outside-interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif case == "float64":
        dtype = torch.float64
    elif case == "head-dim-256":
        head_dim = 256
    q, k, v = (torch.randn(2, 2, n, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    if case == "decode-with-grad":
        offset = n - 3
        q = q[:, :, offset:]
    out = TritonSparseKernel()(q, k, v, pattern, q_offset=offset)
    expected = reference_attention(q, k, v, pattern, q_offset=offset)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
    out.sum().backward()  # differentiable through the dense path


def test_bad_tile_sizes_are_rejected_at_construction():
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        TritonSparseKernel(block_n=8)
    with pytest.raises(ValueError, match="decode_block_n must be a power of two >= 16"):
        TritonSparseKernel(decode_block_n=48)
