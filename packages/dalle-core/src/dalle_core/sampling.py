"""Sampling the next token from logits: top-k, nucleus (top-p), temperature, Gumbel-max."""

from __future__ import annotations

import torch
from torch import Tensor


def top_k(logits: Tensor, thres: float) -> tuple[Tensor, Tensor]:
    """The ``max(1, (1 - thres) * vocab)`` largest logits of ``[B, V]``: values and their
    indices ``[B, k]``, largest first."""
    if not 0.0 <= thres < 1.0:
        raise ValueError(f"filter_thres must be in [0, 1), got {thres}")
    k = max(int((1 - thres) * logits.shape[-1]), 1)
    return logits.topk(k, dim=-1)


def top_p_filter(sorted_logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of logits whose probability mass reaches ``top_p`` (at least one);
    the rest -> -inf. ``sorted_logits [B, k]`` are sorted largest first, as `top_k` gives them."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    probs = sorted_logits.softmax(dim=-1)
    remove = probs.cumsum(dim=-1) - probs >= top_p  # mass before this one
    return sorted_logits.masked_fill(remove, float("-inf"))


def gumbel_sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Draw one index per row of ``logits [B, V]`` with the Gumbel-max trick; 0 = greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    exponential = uniform.clamp_(min=1e-20).log_().neg_()  # Exp(1) draws, > 0
    gumbel = exponential.clamp_(min=1e-20).log_()  # minus the Gumbel noise
    scaled = logits.float() if temperature == 1 else logits.float() / temperature
    return (scaled - gumbel).argmax(dim=-1)


def sample_logits(
    logits: Tensor,
    *,
    filter_thres: float,
    top_p: float | None,
    temperature: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Filter ``logits [B, V]`` by top-k (``filter_thres``) then top-p, and sample ``[B]``.

    Draws only among the kept logits (the rest have probability 0), so the noise is ``[B, k]``.
    """
    values, indices = top_k(logits, filter_thres)  # [B, k] each
    if top_p is not None:
        values = top_p_filter(values, top_p)
    choice = gumbel_sample(values, temperature, generator)  # [B], into the kept logits
    return indices.gather(-1, choice[:, None])[:, 0]
