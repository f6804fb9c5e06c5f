"""Sampling the next token from logits: top-k, nucleus (top-p), temperature, Gumbel-max."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Gumbel noise is drawn ahead for as many steps as fit in this many values (4 MB of float32)
NOISE_CHUNK_VALUES = 1 << 20


def keep_count(thres: float, vocab: int) -> int:
    """How many logits top-k filtering with ``filter_thres=thres`` keeps of ``vocab``:
    ``max(1, (1 - thres) * vocab)``, the largest."""
    if not 0.0 <= thres < 1.0:
        raise ValueError(f"filter_thres must be in [0, 1), got {thres}")
    return max(int((1 - thres) * vocab), 1)


def top_p_filter(sorted_logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of logits whose probability mass reaches ``top_p`` (at least one);
    the rest -> -inf. ``sorted_logits [B, k]`` are sorted largest first, as ``topk`` gives them."""
    probs = sorted_logits.softmax(dim=-1)
    remove = probs.cumsum(dim=-1) - probs >= top_p  # mass before this one
    return sorted_logits.masked_fill(remove, float("-inf"))


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """Standard Gumbel draws ``-log(-log(u))`` of ``shape`` (float32), from ``generator``."""
    uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    exponential = uniform.clamp_(min=1e-20).log_().neg_()  # Exp(1) draws, > 0
    return exponential.clamp_(min=1e-20).log_().neg_()


class Sampler:
    """Draws one token per row from logits ``[rows, vocab]``, once per generation step (at most
    ``steps`` times): top-k (``filter_thres``), then nucleus (``top_p``), then Gumbel-max at
    ``temperature`` (0 = greedy). Draws only among the kept logits (the rest have probability 0), so the noise
    per step is ``[rows, k]``; it is drawn ahead for many steps at once (``argmax(logits / T +
    g)`` is drawn as ``argmax(logits + T g)``), which leaves five operators a step.

    The same ``generator`` state gives the same tokens for the same logits, whichever path
    (cached or not) computed them. ``generator`` may also be a sequence of generators, one per
    row: row ``i`` then draws from generator ``i`` alone, so its tokens do not depend on the
    other rows or on how many there are (requests batched together by a server).
    """

    def __init__(
        self,
        vocab: int,
        rows: int,
        steps: int,
        *,
        filter_thres: float,
        top_p: float | None,
        temperature: float,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        device: torch.device | str = "cpu",
    ):
        self.k = keep_count(filter_thres, vocab)
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if isinstance(generator, Sequence) and len(generator) != rows:
            raise ValueError(f"one generator per row: got {len(generator)} generators for {rows} rows")
        self.top_p, self.temperature = top_p, temperature
        self.rows, self.generator, self.device = rows, generator, device
        self.chunk_steps = max(1, min(steps, NOISE_CHUNK_VALUES // (rows * self.k)))
        self.noise: list[Tensor] = []  # per coming step: [rows, k], scaled by the temperature

    def __call__(self, logits: Tensor) -> Tensor:
        """``logits [rows, vocab]`` (float32) -> token ids ``[rows]``."""
        values, indices = logits.topk(self.k, dim=-1)  # [rows, k] each, largest first
        if self.top_p is not None:
            values = top_p_filter(values, self.top_p)
        if self.temperature > 0:
            values = values + self._next_noise()
        choice = values.argmax(dim=-1, keepdim=True)  # [rows, 1], into the kept logits
        return indices.gather(-1, choice).view(-1)

    def _next_noise(self) -> Tensor:
        if not self.noise:
            if isinstance(self.generator, Sequence):  # each row's noise from its own generator
                rows = [gumbel_noise((self.chunk_steps, 1, self.k), g, self.device) for g in self.generator]
                noise = torch.cat(rows, dim=1)  # [chunk_steps, rows, k]
            else:
                noise = gumbel_noise((self.chunk_steps, self.rows, self.k), self.generator, self.device)
            if self.temperature != 1:
                noise.mul_(self.temperature)
            self.noise = list(noise.unbind(0))[::-1]  # popped from the end: first step last
        return self.noise.pop()
