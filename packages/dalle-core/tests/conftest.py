"""Shared tiny models: small enough that every test runs in well under a second."""

from __future__ import annotations

import os

import pytest
import torch

from dalle_core import DALLE, DiscreteVAE
from dalle_core.attention.patterns import PATTERNS
from dalle_core.download import CACHE_DIR_ENV

TEXT_SEQ_LEN = 6
NUM_TEXT_TOKENS = 50


@pytest.fixture(autouse=True, scope="session")
def session_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Downloads and compiled steps go to a folder of the test session, never the user's cache."""
    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("dalle-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = previous


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


ALL_TYPES = PATTERNS  # every attention type

#: options of the one-token step tests, on top of every attention type
STEP_OPTIONS = [
    {}, {"rotary_emb": False, "shift_tokens": False}, {"reversible": True}, {"upstream_rotary": True},
    {"sandwich_norm": True, "stable": True, "share_input_output_emb": True},
    {"attn_types": ("conv_like", "sparse"), "shared_attn_ids": (0, 1, 0, 1, 2),
     "shared_ff_ids": (0, 0, 1, 1, 0)},
]


def step_case(options: dict) -> tuple[DALLE, torch.Tensor, torch.Tensor, int]:
    """A float64 DALLE of depth 5 over every attention type (with ``options``), inputs ``x [2,
    seq_len, 32]``, a padding mask ``[2, seq_len]`` (the second row's text partly padded) and
    the first position the one-token step runs for."""
    dalle = tiny_dalle(**{"attn_types": ALL_TYPES, "depth": 5, **options}).double().eval()
    x = torch.randn(2, dalle.seq_len, 32, dtype=torch.float64)
    keep = torch.ones(2, dalle.seq_len, dtype=torch.bool)
    keep[1, 4:7] = False
    return dalle, x, keep, dalle.text_len + 3


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def text() -> torch.Tensor:
    """Two captions, the second padded with zeros."""
    return torch.tensor([[3, 7, 9, 11, 2, 5], [4, 8, 1, 0, 0, 0]])
