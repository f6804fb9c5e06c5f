"""Attention references and the conformance suite every attention kernel must pass.

- `brute_force_allowed` / `brute_force_mask`: the pattern rules written out with plain
  integer arithmetic, one (query, key) pair at a time, independently of
  `AttentionPattern.allowed`, to check the masks every kernel is built from.
- `reference_attention`: ``softmax(q k^T / sqrt(D) masked) v`` in float64 on the CPU.
- `AttentionKernelConformance`: compares a kernel with the reference on random inputs.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from dalle_core.attention.kernels import AttentionKernel, pattern_mask
from dalle_core.attention.patterns import PATTERNS, AttentionPattern


def brute_force_allowed(pattern: AttentionPattern, query: int, key: int) -> bool:
    """Whether sequence position ``query`` may attend to position ``key`` under ``pattern``."""
    if key > query:
        return False  # causal
    if key < pattern.text_len:
        return True  # everyone sees earlier text; a text query only has text keys
    # both are image codes: rows and columns of the fmap_size x fmap_size grid
    query_row, query_col = divmod(query - pattern.text_len, pattern.fmap_size)
    key_row, key_col = divmod(key - pattern.text_len, pattern.fmap_size)
    if pattern.kind == "full":
        return True
    if pattern.kind == "axial_row":
        return key_row == query_row
    if pattern.kind == "axial_col":
        return key_col == query_col
    if pattern.kind == "conv_like":
        rows_apart, cols_apart = abs(key_row - query_row), abs(key_col - query_col)
        reach = (pattern.kernel_size // 2) * pattern.dilation
        return (
            rows_apart <= reach
            and cols_apart <= reach
            and rows_apart % pattern.dilation == 0
            and cols_apart % pattern.dilation == 0
        )
    if pattern.kind == "conv_like_trailing":
        rows_back, cols_back = query_row - key_row, query_col - key_col
        window = (pattern.kernel_size - 1) * pattern.dilation
        return (
            0 <= rows_back <= window
            and 0 <= cols_back <= window
            and rows_back % pattern.dilation == 0
            and cols_back % pattern.dilation == 0
        )
    if pattern.kind == "sparse":
        blocks_back = query // pattern.block_size - key // pattern.block_size
        return blocks_back < pattern.num_local_blocks
    raise ValueError(f"no brute-force rule for pattern {pattern.kind!r}")


def brute_force_mask(
    pattern: AttentionPattern, n_q: int | None = None, n_k: int | None = None, q_offset: int = 0
) -> Tensor:
    """Boolean ``[n_q, n_k]`` mask (default: the whole sequence) from `brute_force_allowed`."""
    n_q = pattern.seq_len - q_offset if n_q is None else n_q
    n_k = pattern.seq_len if n_k is None else n_k
    rows = [[brute_force_allowed(pattern, q_offset + i, j) for j in range(n_k)] for i in range(n_q)]
    return torch.tensor(rows, dtype=torch.bool).reshape(n_q, n_k)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: AttentionPattern,
    *,
    q_offset: int = 0,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Dense float64 attention on the CPU: ``softmax(q k^T / sqrt(D) masked) v``.

    Takes the same arguments as an `AttentionKernel` call and is differentiable, so gradients
    can be compared too. Every query must be left at least one key (position 0 always is).
    """
    q, k, v = (t.to("cpu", torch.float64) for t in (q, k, v))
    padding = key_padding_mask.cpu() if key_padding_mask is not None else None
    mask = pattern_mask(pattern, q.shape[-2], k.shape[-2], q_offset, padding, "cpu")
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


class AttentionKernelConformance:
    """Conformance suite for an attention kernel: subclass it and define `make_kernel`.

    Every test runs for each pattern, layout and dtype the kernel `supports` on `device` and is
    skipped otherwise; outputs (and gradients, when the kernel supports them) are compared with
    `reference_attention`. Class attributes tune the suite to the kernel::

        class TestMyKernel(AttentionKernelConformance):
            device = "cuda"
            dtypes = (torch.float16, torch.bfloat16)

            def make_kernel(self):
                return MyKernel()
    """

    device: str = "cpu"
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    #: ``assert_close`` tolerances per dtype, for outputs and gradients
    tolerances: ClassVar[dict[torch.dtype, dict[str, float]]] = {
        torch.float64: {"atol": 1e-9, "rtol": 1e-7},
        torch.float32: {"atol": 2e-5, "rtol": 1e-4},
        torch.float16: {"atol": 3e-3, "rtol": 3e-3},
        torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
    }
    #: `AttentionPattern` keywords besides the kind: a small grid (20 positions) and an odd
    #: sequence length (19 positions) with a dilated convolution and uneven sparse blocks
    layouts: ClassVar[tuple[dict[str, int], ...]] = (
        {"text_len": 5, "fmap_size": 4, "kernel_size": 3, "block_size": 4, "num_local_blocks": 2},
        {
            "text_len": 4,
            "fmap_size": 4,
            "kernel_size": 5,
            "dilation": 2,
            "block_size": 3,
            "num_local_blocks": 3,
        },
    )
    batch_size: int = 2
    heads: int = 2
    head_dim: int = 16

    def make_kernel(self) -> AttentionKernel:
        """The kernel under test."""
        raise NotImplementedError(f"{type(self).__name__} must define make_kernel()")

    @pytest.fixture
    def kernel(self) -> AttentionKernel:
        return self.make_kernel()

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize over patterns, this class's layouts and its dtypes."""
        if "pattern_kind" in metafunc.fixturenames:
            metafunc.parametrize("pattern_kind", PATTERNS)
        if "layout" in metafunc.fixturenames:
            ids = [f"text{layout['text_len']}-fmap{layout['fmap_size']}" for layout in self.layouts]
            metafunc.parametrize("layout", self.layouts, ids=ids)
        if "dtype" in metafunc.fixturenames:
            metafunc.parametrize(
                "dtype", self.dtypes, ids=[str(d).removeprefix("torch.") for d in self.dtypes]
            )

    # helpers

    def require(
        self,
        kernel: AttentionKernel,
        kind: str,
        dtype: torch.dtype,
        needs_grad: bool = False,
        decoding: bool = False,
    ) -> None:
        """Skip the test unless the kernel supports this kind of call here."""
        device_type = torch.device(self.device).type
        if not kernel.supports(kind, device_type, dtype, needs_grad, decoding):
            pytest.skip(
                f"{type(kernel).__name__} does not support {kind} on {device_type} in {dtype}"
                f" (needs_grad={needs_grad}, decoding={decoding})"
            )

    def inputs(self, length: int, dtype: torch.dtype) -> list[Tensor]:
        """Seeded random q, k, v ``[B, H, length, D]`` on the device, in ``dtype``."""
        generator = torch.Generator().manual_seed(0)
        shape = (self.batch_size, self.heads, length, self.head_dim)
        return [torch.randn(shape, generator=generator).to(self.device, dtype) for _ in range(3)]

    def padding_mask(self, pattern: AttentionPattern, length: int) -> Tensor:
        """``[B, length]``: the first sample keeps every key, the others lose their last two
        text positions (padded text); position 0 (bos) is always kept."""
        mask = torch.ones(self.batch_size, length, dtype=torch.bool)
        mask[1:, max(1, pattern.text_len - 2) : pattern.text_len] = False
        return mask.to(self.device)

    def assert_matches(self, actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
        torch.testing.assert_close(
            actual.detach().to("cpu", torch.float64), expected.detach(), **self.tolerances[dtype]
        )

    # tests

    def test_declares_what_it_supports(self, kernel: AttentionKernel) -> None:
        assert isinstance(kernel, AttentionKernel)
        assert kernel.name, "a kernel has the name it is registered under"
        assert kernel.patterns <= set(PATTERNS), f"unknown patterns in {set(kernel.patterns)}"
        assert isinstance(kernel.supports("full", "cpu", torch.float32, False, False), bool)

    @pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
    def test_forward_matches_reference(
        self, kernel: AttentionKernel, pattern_kind: str, layout: dict, dtype: torch.dtype, padded
    ) -> None:
        self.require(kernel, pattern_kind, dtype)
        pattern = AttentionPattern(pattern_kind, **layout)
        for length in (pattern.seq_len, pattern.seq_len // 2 + 1):  # whole sequence, a prefix
            q, k, v = self.inputs(length, dtype)
            padding = self.padding_mask(pattern, length) if padded else None
            with torch.no_grad():
                out = kernel(q, k, v, pattern, key_padding_mask=padding)
            assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
            expected = reference_attention(q, k, v, pattern, key_padding_mask=padding)
            self.assert_matches(out, expected, dtype)

    @pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
    def test_decode_step_matches_reference(
        self, kernel: AttentionKernel, pattern_kind: str, layout: dict, dtype: torch.dtype, padded
    ) -> None:
        self.require(kernel, pattern_kind, dtype, decoding=True)
        pattern = AttentionPattern(pattern_kind, **layout)
        q, k, v = self.inputs(pattern.seq_len, dtype)
        padding = self.padding_mask(pattern, pattern.seq_len) if padded else None
        # the last text position, the first image code, one in the grid, the last position
        text_len, last = pattern.text_len, pattern.seq_len - 1
        for offset in sorted(
            {text_len - 1, text_len, min(text_len + pattern.fmap_size + 1, last), last}
        ):
            keys = offset + 1
            step_padding = None if padding is None else padding[:, :keys]
            q_step, k_seen, v_seen = q[:, :, offset : offset + 1], k[:, :, :keys], v[:, :, :keys]
            with torch.no_grad():
                out = kernel(
                    q_step, k_seen, v_seen, pattern, q_offset=offset, key_padding_mask=step_padding
                )
            assert out.shape == q_step.shape and out.dtype == dtype
            expected = reference_attention(
                q_step, k_seen, v_seen, pattern, q_offset=offset, key_padding_mask=step_padding
            )
            self.assert_matches(out, expected, dtype)

    @pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
    def test_gradients_match_reference(
        self, kernel: AttentionKernel, pattern_kind: str, layout: dict, dtype: torch.dtype, padded
    ) -> None:
        self.require(kernel, pattern_kind, dtype, needs_grad=True)
        pattern = AttentionPattern(pattern_kind, **layout)
        inputs = [t.requires_grad_() for t in self.inputs(pattern.seq_len, dtype)]
        references = [t.detach().to("cpu", torch.float64).requires_grad_() for t in inputs]
        padding = self.padding_mask(pattern, pattern.seq_len) if padded else None
        grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))

        kernel(*inputs, pattern, key_padding_mask=padding).backward(grad_out.to(self.device, dtype))
        reference_attention(*references, pattern, key_padding_mask=padding).backward(
            grad_out.double()
        )
        for name, actual, expected in zip("qkv", inputs, references, strict=True):
            assert actual.grad is not None, f"no gradient reached {name}"
            self.assert_matches(actual.grad, expected.grad, dtype)
