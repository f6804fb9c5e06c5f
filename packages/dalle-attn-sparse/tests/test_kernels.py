"""The Triton kernels in the CPU interpreter against a float64 dense reference.

Every test draws its own random inputs (seeded per test in conftest) and compares with
`dalle_core.testing.reference_attention`: float64, with the mask from dalle-core's own
`AttentionPattern`, on the inputs as rounded to the tested dtype. Tolerances for
``torch.testing.assert_close`` on outputs and on dq / dk / dv are in `TOLERANCES`.
The dalle-core conformance suite (test_conformance.py) adds fp32 calls with the suite's layouts.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from conftest import requires_interpreter

from dalle_attn_sparse import LaunchConfig
from dalle_attn_sparse.layout import attention_layout, sequence_order
from dalle_attn_sparse.ops import (
    attention_backward,
    attention_forward,
    kernel_positions,
    sparse_attention,
    sparse_decode,
)
from dalle_attn_sparse.triton_kernels import KIND_CODES, _allowed
from dalle_core.attention.patterns import PATTERNS, AttentionPattern
from dalle_core.testing import reference_attention

pytestmark = requires_interpreter

#: assert_close tolerances per dtype, for outputs and dq / dk / dv
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}

#: odd sequence lengths (21 and 43 positions), a dilated convolution, uneven sparse blocks
LAYOUTS = {
    "text6-fmap4": dict(text_len=6, fmap_size=4, kernel_size=3, block_size=4, num_local_blocks=2),
    "text8-fmap6": dict(text_len=8, fmap_size=6, kernel_size=5, dilation=2, block_size=5,
                        num_local_blocks=3),
}


@triton.jit
def rule_kernel(OUT, text_len, fmap, reach, dilation, sparse_block, local_blocks,
                KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Writes `_allowed` for every pair of positions ``0 .. BLOCK - 1`` into ``OUT [BLOCK, BLOCK]``."""
    offs = tl.arange(0, BLOCK)
    ok = _allowed(offs[:, None], offs[None, :], text_len, fmap, reach, dilation, sparse_block,
                  local_blocks, KIND)
    tl.store(OUT + offs[:, None] * BLOCK + offs[None, :], ok.to(tl.int8))


def random_inputs(shape, dtype, requires_grad=True):
    tensors = [torch.randn(shape).to(dtype) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def padding_mask(batch: int, n: int, pattern: AttentionPattern) -> torch.Tensor:
    """Random padded text keys on every sample but the first; position 0 is always kept."""
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[1:, 1 : pattern.text_len] = torch.rand(batch - 1, pattern.text_len - 1) > 0.4
    return mask


def assert_matches(actual, expected, dtype, what):
    torch.testing.assert_close(actual.detach().double(), expected.detach(), **TOLERANCES[dtype],
                               msg=lambda message: f"{what}: {message}")


def check_against_reference(pattern, q, k, v, out, key_padding_mask=None):
    """Backprop a random gradient through ``out`` and the reference; compare all four."""
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*refs, pattern, key_padding_mask=key_padding_mask)
    grad = torch.randn(out.shape)
    out.backward(grad.to(out.dtype))
    expected.backward(grad.double())
    assert_matches(out, expected, q.dtype, "output")
    for name, actual, reference in zip("qkv", (q, k, v), refs, strict=True):
        assert actual.grad is not None, f"no gradient reached {name}"
        assert_matches(actual.grad, reference.grad, q.dtype, f"d{name}")


@pytest.mark.parametrize("kind", PATTERNS)
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)], ids=["m16n16", "m32n16", "m16n32"])
def test_forward_and_gradients_match_reference_fp32(kind, blocks):
    """43 positions (3 partial tiles of 16), padded text keys in the second sample."""
    pattern = AttentionPattern(kind, **LAYOUTS["text8-fmap6"])
    q, k, v = random_inputs((2, 1, pattern.seq_len, 32), torch.float32)
    mask = padding_mask(2, pattern.seq_len, pattern)
    out = sparse_attention(q, k, v, pattern, mask, LaunchConfig(*blocks))
    check_against_reference(pattern, q, k, v, out, mask)


@pytest.mark.parametrize("kind", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_and_gradients_match_reference_half(kind, dtype):
    """A 39-position prefix of the sequence, head dim 64."""
    pattern = AttentionPattern(kind, **LAYOUTS["text8-fmap6"])
    q, k, v = random_inputs((1, 2, pattern.seq_len - 4, 64), dtype)
    out = sparse_attention(q, k, v, pattern, None, LaunchConfig(16, 16))
    assert out.dtype == dtype
    check_against_reference(pattern, q, k, v, out)


@pytest.mark.parametrize("head_dim", [32, 64, 128, 24])
def test_head_dims(head_dim):
    """The head dims DALL-E uses, and one that is not a power of two (padded in the kernel)."""
    pattern = AttentionPattern("conv_like", **LAYOUTS["text6-fmap4"])
    q, k, v = random_inputs((1, 1, pattern.seq_len, head_dim), torch.float32)
    out = sparse_attention(q, k, v, pattern, None, LaunchConfig(16, 16))
    check_against_reference(pattern, q, k, v, out)


def test_non_contiguous_inputs_as_the_transformer_passes_them():
    """q, k, v as views of one fused projection ``[B, N, 3, H, D]``; gradient not contiguous."""
    pattern = AttentionPattern("axial_col", **LAYOUTS["text6-fmap4"])
    qkv = torch.randn(2, pattern.seq_len, 3, 2, 32, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, H, N, D] each, strided
    out = sparse_attention(q, k, v, pattern, None, LaunchConfig(16, 16))
    reference = qkv.detach().double().requires_grad_()
    expected = reference_attention(*reference.permute(2, 0, 3, 1, 4), pattern)
    grad = torch.randn(2, 2, 32, pattern.seq_len).transpose(-1, -2)  # strided gradient
    out.backward(grad)
    expected.backward(grad.double())
    assert_matches(out, expected, torch.float32, "output")
    assert_matches(qkv.grad, reference.grad, torch.float32, "dqkv")


@pytest.mark.parametrize("kind", PATTERNS)
def test_every_element_is_written_into_poisoned_buffers(kind):
    """Output, log-sum-exp and gradient buffers start as NaN: none may stay NaN, and all match
    the reference (in the kernel's order: column-major image for ``axial_col``)."""
    pattern = AttentionPattern(kind, **LAYOUTS["text6-fmap4"])
    n, config, cpu = pattern.seq_len, LaunchConfig(16, 16), torch.device("cpu")
    order = sequence_order(pattern, n, cpu)
    order = torch.arange(n) if order is None else order
    q, k, v = random_inputs((2, 1, n, 32), torch.float32, requires_grad=False)
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*refs, pattern)
    grad = torch.randn(q.shape)
    expected.backward(grad.double())

    q, k, v, grad = (t[:, :, order].contiguous() for t in (q, k, v, grad))  # kernel order
    layout = attention_layout(pattern, n, 16, 16, cpu)
    positions = kernel_positions(pattern, n, cpu)
    out, lse = torch.full_like(q, float("nan")), torch.full((2, n), float("nan"))
    attention_forward(q, k, v, pattern, layout, positions, None, config, out=out, lse=lse)
    grads = tuple(torch.full_like(q, float("nan")) for _ in range(3))
    attention_backward(grad, q, k, v, out, lse, pattern, layout, positions, None, config, grads=grads)
    for name, tensor in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), strict=True):
        assert not tensor.isnan().any(), f"{name} has unwritten (NaN) elements"
    assert_matches(out, expected[:, :, order], torch.float32, "output")
    for name, actual, reference in zip("qkv", grads, refs, strict=True):
        assert_matches(actual, reference.grad[:, :, order], torch.float32, f"d{name}")


@pytest.mark.parametrize("kind", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_steps_match_reference(kind, dtype):
    """Cached generation: one query row (and a two-row chunk) at several offsets, padded text
    keys, over 16-wide key tiles (fp32 is covered by the conformance suite)."""
    pattern = AttentionPattern(kind, **LAYOUTS["text8-fmap6"])
    n = pattern.seq_len
    q, k, v = random_inputs((2, 1, n, 32), dtype, requires_grad=False)
    mask = padding_mask(2, n, pattern)
    for offset, rows in ((pattern.text_len - 1, 1), (pattern.text_len + 7, 1), (25, 2), (n - 1, 1)):
        keys = offset + rows
        step = (q[:, :, offset : offset + rows], k[:, :, :keys], v[:, :, :keys])
        out = sparse_decode(*step, pattern, offset, mask[:, :keys], LaunchConfig(16, 16, 16))
        expected = reference_attention(*step, pattern, q_offset=offset, key_padding_mask=mask[:, :keys])
        assert out.dtype == dtype
        assert_matches(out, expected, dtype, f"offset {offset}")


def test_element_rule_reproduces_pattern_allowed_exactly():
    """`_allowed` in Triton against `AttentionPattern.allowed` on every (query, key) pair of a
    larger grid, for several kernel sizes, dilations and sparse block settings."""
    variants = [dict(kernel_size=3, dilation=1, block_size=4, num_local_blocks=2),
                dict(kernel_size=5, dilation=2, block_size=7, num_local_blocks=3),
                dict(kernel_size=7, dilation=3, block_size=16, num_local_blocks=1)]
    for kind in PATTERNS:
        for variant in variants:
            pattern = AttentionPattern(kind, text_len=9, fmap_size=7, **variant)
            n = pattern.seq_len  # 57
            out = torch.empty(64, 64, dtype=torch.int8)
            rule_kernel[(1,)](out, pattern.text_len, pattern.fmap_size,
                              (pattern.kernel_size // 2) * pattern.dilation, pattern.dilation,
                              pattern.block_size, pattern.num_local_blocks, KIND_CODES[kind], 64)
            positions = torch.arange(n)
            expected = pattern.allowed(positions[:, None], positions[None, :])
            assert torch.equal(out[:n, :n].bool(), expected), (kind, variant)


def test_bad_inputs_are_clear_errors():
    pattern = AttentionPattern("full", text_len=3, fmap_size=2)
    q = torch.randn(1, 2, 6, 16)
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        sparse_attention(q[0], q[0], q[0], pattern)
    with pytest.raises(ValueError, match="longer than the pattern's 6"):
        sparse_attention(*(torch.randn(1, 2, 7, 16) for _ in range(3)), pattern)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, Nk\]"):
        sparse_attention(q, q, q, pattern, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="as many keys as queries"):
        sparse_attention(q[:, :, :4], q, q, pattern)
    with pytest.raises(ValueError, match="do not fit together"):
        sparse_attention(q, q[..., :8], q, pattern)
    with pytest.raises(ValueError, match="the cache holds 3 keys, fewer than the 5 positions"):
        sparse_decode(q[:, :, :1], q[:, :, :3], q[:, :, :3], pattern, 4)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        LaunchConfig(block_m=24)
