"""Seeds derived from several integers, so that every random choice the data makes is a pure
function of (seed, epoch, index) and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One step of SplitMix64: a bijection of 64-bit integers that spreads every input bit."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def mix(*values: int) -> int:
    """A 64-bit seed from any number of integers (negative ones included); the order matters:
    ``mix(0, 1, 2) != mix(0, 2, 1)``."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ (int(value) & _MASK))
    return state


def generator(*values: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded with ``mix(*values)``."""
    return torch.Generator().manual_seed(mix(*values))
