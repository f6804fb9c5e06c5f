"""Sampling the next token from logits: top-k, nucleus (top-p), temperature, Gumbel-max."""

from __future__ import annotations

import torch
from torch import Tensor


def top_k_filter(logits: Tensor, thres: float) -> Tensor:
    """Keep the ``max(1, (1 - thres) * vocab)`` largest logits ``[B, V]``; the rest -> -inf."""
    if not 0.0 <= thres < 1.0:
        raise ValueError(f"filter_thres must be in [0, 1), got {thres}")
    k = max(int((1 - thres) * logits.shape[-1]), 1)
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of logits whose probability mass reaches ``top_p`` (at least one)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this one
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)


def gumbel_sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Draw one index per row of ``logits [B, V]`` with the Gumbel-max trick; 0 = greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    exponential = -torch.log(uniform.clamp(min=1e-20))  # Exp(1) draws, > 0
    gumbel = -torch.log(exponential.clamp(min=1e-20))
    return (logits.float() / temperature + gumbel).argmax(dim=-1)


def sample_logits(
    logits: Tensor,
    *,
    filter_thres: float,
    top_p: float | None,
    temperature: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Filter ``logits [B, V]`` by top-k (``filter_thres``) then top-p, and sample ``[B]``."""
    logits = top_k_filter(logits, filter_thres)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return gumbel_sample(logits, temperature, generator)
