"""Shared tiny models: small enough that every test runs in well under a second."""

from __future__ import annotations

import pytest
import torch

from dalle_core import DALLE, DiscreteVAE

TEXT_SEQ_LEN = 6
NUM_TEXT_TOKENS = 50


def tiny_vae() -> DiscreteVAE:
    """16 px images -> 4 x 4 = 16 codes out of 32."""
    torch.manual_seed(0)
    return DiscreteVAE(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8)


def tiny_dalle(**overrides) -> DALLE:
    torch.manual_seed(0)
    kwargs = dict(
        dim=32, vae=tiny_vae(), num_text_tokens=NUM_TEXT_TOKENS, text_seq_len=TEXT_SEQ_LEN,
        depth=2, heads=2, dim_head=16,
    )
    kwargs.update(overrides)
    return DALLE(**kwargs)


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def text() -> torch.Tensor:
    """Two captions, the second padded with zeros."""
    return torch.tensor([[3, 7, 9, 11, 2, 5], [4, 8, 1, 0, 0, 0]])
