"""The compiled kernels on a GPU (``TRITON_INTERPRET=0 pytest -m gpu``; skipped elsewhere):
DALL-E-like sizes, the default tiles, against the float64 reference on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_compiled_cuda

from dalle_attn_sparse import TritonSparseKernel
from dalle_core.attention.patterns import PATTERNS, AttentionPattern
from dalle_core.testing import reference_attention

pytestmark = [pytest.mark.gpu, requires_compiled_cuda]

#: assert_close tolerances per dtype on outputs and gradients (sequences of a few hundred keys)
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-3),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}


@pytest.mark.parametrize("kind", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_forward_and_gradients_at_dalle_like_sizes(kind, dtype, head_dim):
    """65 text positions and a 16 x 16 grid: 320 positions, not a multiple of the tiles."""
    pattern = AttentionPattern(kind, text_len=65, fmap_size=16, kernel_size=5, dilation=2)
    shape = (2, 4, pattern.seq_len, head_dim)
    q, k, v = (torch.randn(shape, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    padding = torch.ones(2, pattern.seq_len, dtype=torch.bool, device="cuda")
    padding[1, 40:65] = False
    refs = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    out = TritonSparseKernel()(q, k, v, pattern, key_padding_mask=padding)
    expected = reference_attention(*refs, pattern, key_padding_mask=padding.cpu())
    grad = torch.randn(shape)
    out.backward(grad.to("cuda", dtype))
    expected.backward(grad.double())
    torch.testing.assert_close(out.detach().cpu().double(), expected.detach(), **TOLERANCES[dtype])
    for name, actual, reference in zip("qkv", (q, k, v), refs, strict=True):
        torch.testing.assert_close(actual.grad.cpu().double(), reference.grad, **TOLERANCES[dtype],
                                   msg=lambda message, name=name: f"d{name}: {message}")


@pytest.mark.parametrize("kind", PATTERNS)
def test_decode_steps_at_dalle_like_sizes(kind):
    pattern = AttentionPattern(kind, text_len=65, fmap_size=16)
    q, k, v = (torch.randn(2, 4, pattern.seq_len, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kernel = TritonSparseKernel()
    for offset in (64, 65, 200, pattern.seq_len - 1):
        step = (q[:, :, offset : offset + 1], k[:, :, : offset + 1], v[:, :, : offset + 1])
        with torch.no_grad():
            out = kernel(*step, pattern, q_offset=offset)
        expected = reference_attention(*step, pattern, q_offset=offset)
        torch.testing.assert_close(out.cpu().double(), expected, **TOLERANCES[torch.bfloat16])
