"""dalle-core's built-in plugins pass the conformance suites that third-party plugins use."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dalle_core.attention.kernels import FlexKernel, SDPAKernel
from dalle_core.attention.patterns import PATTERNS, AttentionPattern
from dalle_core.backends import SingleProcessBackend
from dalle_core.plugins import reset_plugins
from dalle_core.testing import (
    AttentionKernelConformance,
    BackendConformance,
    TokenizerConformance,
    VAEConformance,
    brute_force_mask,
)
from dalle_core.tokenizers import ByteTokenizer
from dalle_core.vae import DiscreteVAE


@pytest.fixture(autouse=True)
def builtin_plugins_only(monkeypatch: pytest.MonkeyPatch):
    """Reloads go through the registry: use only core's plugins, whatever else is installed."""
    monkeypatch.setenv("DALLE_DISABLE_PLUGIN_AUTOLOAD", "1")
    reset_plugins()
    yield
    reset_plugins()


class TestByteTokenizer(TokenizerConformance):
    def make_tokenizer(self):
        return ByteTokenizer()

    def test_bytes_shifted_by_one(self, tokenizer):
        assert tokenizer.vocab_size == 257
        assert tokenizer.encode("Aé") == [ord("A") + 1, 0xC3 + 1, 0xA9 + 1]
        assert tokenizer.decode([0, 66, 0, 300, 67]) == "AB"

    def test_broken_utf8_is_replaced(self, tokenizer):
        assert tokenizer.decode([0xC3 + 1]) == "\ufffd"


class TestSingleProcessBackend(BackendConformance):
    def make_backend(self):
        return SingleProcessBackend()


class TestSDPAKernel(AttentionKernelConformance):
    dtypes = (torch.float32, torch.float64)

    def make_kernel(self):
        return SDPAKernel()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
class TestFlexKernel(AttentionKernelConformance):
    """Eager FlexAttention on the CPU: inference only (no CPU backward, no decode steps).

    One layout, the odd-length one: each new pattern costs FlexAttention a trace of ~0.5 s.
    """

    layouts = AttentionKernelConformance.layouts[1:]

    def make_kernel(self):
        return FlexKernel(compile=False)


class TestDiscreteVAE(VAEConformance):
    def make_vae(self):
        return DiscreteVAE(
            image_size=32, num_layers=2, num_tokens=16, codebook_dim=16, hidden_dim=16
        )


@settings(max_examples=60, derandomize=True, deadline=None, database=None)
@given(
    kind=st.sampled_from(PATTERNS),
    text_len=st.integers(1, 8),
    fmap_size=st.integers(1, 6),
    kernel_size=st.sampled_from([1, 3, 5, 7]),
    dilation=st.integers(1, 3),
    block_size=st.integers(1, 9),
    num_local_blocks=st.integers(1, 4),
)
def test_dense_mask_follows_the_pattern_rules(kind, text_len, fmap_size, **layout):
    """`AttentionPattern.dense_mask` against the brute-force rules, whole and sliced."""
    pattern = AttentionPattern(kind, text_len, fmap_size, **layout)
    assert torch.equal(
        pattern.dense_mask(pattern.seq_len, pattern.seq_len), brute_force_mask(pattern)
    )
    for offset in {0, text_len - 1, pattern.seq_len - 1}:
        step = pattern.dense_mask(1, offset + 1, q_offset=offset)
        assert torch.equal(step, brute_force_mask(pattern, 1, offset + 1, q_offset=offset))


def test_brute_force_rules_by_hand():
    """A few cases worked out on paper, so the reference itself is checked."""
    # text_len 2, a 3 x 3 grid: position 2 + 3 * row + col

    def at(row: int, col: int) -> int:
        return 2 + 3 * row + col

    row = AttentionPattern("axial_row", text_len=2, fmap_size=3)
    col = AttentionPattern("axial_col", text_len=2, fmap_size=3)
    conv = AttentionPattern("conv_like", text_len=2, fmap_size=3, kernel_size=3)
    mask_row, mask_col, mask_conv = (brute_force_mask(p) for p in (row, col, conv))
    assert mask_row[at(1, 2), at(1, 0)] and not mask_row[at(1, 2), at(0, 2)]
    assert mask_col[at(1, 2), at(0, 2)] and not mask_col[at(1, 2), at(1, 0)]
    assert mask_conv[at(2, 1), at(1, 0)] and not mask_conv[at(2, 1), at(0, 1)]
    assert all(mask_row[at(2, 1), :2]) and not mask_row[0, 1]  # text: all of it, causally


def test_a_process_among_several_gets_the_gpu_of_its_local_rank(monkeypatch) -> None:
    from dalle_core.backends import local_device

    current: list[object] = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert local_device(torch.device("cpu"), 3) == torch.device("cpu") and current == []
    assert local_device(torch.device("cuda"), 3) == torch.device("cuda", 3)
    assert local_device(torch.device("cuda", 0), 1) == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 3), torch.device("cuda", 1)]
