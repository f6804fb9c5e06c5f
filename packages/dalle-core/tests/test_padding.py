"""`pad_batch`, the vectorised padding behind every `Tokenizer.tokenize`, against a plain
per-row loop on random batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dalle_core.padding import pad_batch
from dalle_core.tokenizers import ByteTokenizer


def padded_row_by_row(encoded: list[list[int]], context_length: int, truncate: bool) -> torch.Tensor:
    result = torch.zeros(len(encoded), context_length, dtype=torch.long)
    for index, ids in enumerate(encoded):
        if len(ids) > context_length and not truncate:
            raise ValueError(f"text {index} is {len(ids)} tokens long")
        ids = ids[:context_length]
        result[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.text(max_size=12), max_size=6), st.integers(0, 14), st.booleans())
def test_equal_to_a_per_row_loop(texts: list[str], context_length: int, truncate: bool) -> None:
    tokenizer = ByteTokenizer()
    encoded = [tokenizer.encode(text) for text in texts]
    try:
        expected = padded_row_by_row(encoded, context_length, truncate)
    except ValueError as error:
        with pytest.raises(ValueError, match=f"^{error}, more than the context length {context_length};"):
            tokenizer.tokenize(texts, context_length, truncate)
        return
    assert torch.equal(tokenizer.tokenize(texts, context_length, truncate), expected)


def test_too_long_names_the_first_text_too_long() -> None:
    with pytest.raises(ValueError, match=r"^text 1 is 5 tokens long, more than the context length 3;"):
        pad_batch([[1], [1, 2, 3, 4, 5], [1, 2, 3, 4]], 3, truncate_text=False)
    assert pad_batch([], 3, False).shape == (0, 3)
    with pytest.raises(ValueError, match="context_length must be >= 0, got -1"):
        pad_batch([[1]], -1, truncate_text=True)
