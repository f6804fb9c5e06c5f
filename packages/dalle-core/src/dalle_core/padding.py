"""Right-padding a batch of token-id lists into one tensor, with one write."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch
from torch import Tensor


def pad_batch(encoded: Sequence[Sequence[int]], context_length: int, truncate_text: bool) -> Tensor:
    """Ids per text -> ``LongTensor[B, context_length]``, right-padded with 0.

    A text longer than ``context_length`` is cut when ``truncate_text`` is true and is otherwise
    a `ValueError` naming its index and length.
    """
    if context_length < 0:
        raise ValueError(f"context_length must be >= 0, got {context_length}")
    lengths = [len(ids) for ids in encoded]
    for index, length in enumerate(lengths):
        if length > context_length and not truncate_text:
            raise ValueError(
                f"text {index} is {length} tokens long, more than the context length "
                f"{context_length}; shorten it or pass truncate_text=True"
            )
    if truncate_text:
        encoded = [ids[:context_length] for ids in encoded]
        lengths = [min(length, context_length) for length in lengths]
    result = torch.zeros(len(encoded), context_length, dtype=torch.long)
    counts = torch.tensor(lengths, dtype=torch.long)  # [B]
    total = int(counts.sum())
    if total:
        flat = torch.tensor(list(chain.from_iterable(encoded)), dtype=torch.long)  # [total]
        rows = torch.repeat_interleave(torch.arange(len(encoded)), counts)  # [total]
        starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # [total]
        result[rows, torch.arange(total) - starts] = flat
    return result
