"""Attention kernels: the interface, and core's two implementations (SDPA and FlexAttention).

A kernel computes ``softmax(q k^T / sqrt(D) + mask) v`` for q ``[B, H, Nq, D]`` and k, v
``[B, H, Nk, D]``, where the mask comes from an `AttentionPattern`. Queries sit at sequence
positions ``q_offset .. q_offset + Nq - 1`` (``q_offset > 0`` while generating with a key/value
cache); keys at ``0 .. Nk - 1``. ``key_padding_mask [B, Nk]`` (True = keep) hides padded text.
Attention dropout is not a kernel's job: DALLE drops out after the output projection.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle_core.attention.patterns import PATTERNS, AttentionPattern

FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


class AttentionKernel(ABC):
    """Computes masked causal attention for one layer. Registered by name; see hookspecs.

    Class attributes declare what it supports; `supports` refines that per call, and `priority`
    ranks usable kernels for ``attn_kernel="auto"`` (highest wins).
    """

    name: ClassVar[str] = ""
    patterns: ClassVar[frozenset[str]] = frozenset(PATTERNS)
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    dtypes: ClassVar[frozenset[torch.dtype]] = FLOAT_DTYPES

    def supports(
        self, pattern: str, device_type: str, dtype: torch.dtype, needs_grad: bool, decoding: bool
    ) -> bool:
        """Whether this kernel can serve one call. ``decoding``: queries are not the whole
        sequence from position 0 (a cached generation step)."""
        return pattern in self.patterns and device_type in self.devices and dtype in self.dtypes

    def priority(self, pattern: str, device_type: str) -> int:
        """Rank among usable kernels for ``auto``; higher is preferred."""
        return 0

    @abstractmethod
    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pattern: AttentionPattern,
        *,
        q_offset: int = 0,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attention output ``[B, H, Nq, D]``."""


def pattern_mask(
    pattern: AttentionPattern, n_q: int, n_k: int, q_offset: int, key_padding_mask: Tensor | None, device
) -> Tensor:
    """Boolean mask ``[Nq, Nk]`` (or ``[B, 1, Nq, Nk]`` with a padding mask); True = attend."""
    mask = pattern.dense_mask(n_q, n_k, q_offset, device)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    return mask


class SDPAKernel(AttentionKernel):
    """``torch.nn.functional.scaled_dot_product_attention``: every pattern, device and dtype.

    ``full`` without padding uses ``is_causal`` (flash / memory-efficient kernels); other
    patterns pass a boolean mask built once per pattern and device.
    """

    name = "sdpa"

    def priority(self, pattern: str, device_type: str) -> int:
        return 10 if pattern == "full" else 1

    def __call__(self, q, k, v, pattern, *, q_offset=0, key_padding_mask=None):
        n_q, n_k = q.shape[-2], k.shape[-2]
        if pattern.kind == "full" and key_padding_mask is None:
            if q_offset == 0 and n_q == n_k:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if n_q == 1 and q_offset + 1 == n_k:  # one new query sees every cached key
                return F.scaled_dot_product_attention(q, k, v)
        mask = pattern_mask(pattern, n_q, n_k, q_offset, key_padding_mask, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FlexKernel(AttentionKernel):
    """FlexAttention with block masks: skips whole blocks the pattern never visits.

    Serves full-sequence calls on GPU (forward and backward) and CPU (inference only: there is
    no CPU backward); cached generation steps fall back to `SDPAKernel`. Compiled with
    ``torch.compile`` unless ``compile=False`` (the eager path is a slow reference).
    """

    name = "flex"

    def __init__(self, compile: bool = True):
        self.compile = compile

    def supports(self, pattern, device_type, dtype, needs_grad, decoding):
        if decoding or (device_type == "cpu" and needs_grad):
            return False
        return super().supports(pattern, device_type, dtype, needs_grad, decoding)

    def priority(self, pattern: str, device_type: str) -> int:
        return 5 if device_type == "cuda" and pattern != "full" else 0

    @functools.cached_property
    def _attend(self):
        from torch.nn.attention.flex_attention import flex_attention

        return torch.compile(flex_attention, dynamic=False) if self.compile else flex_attention

    def __call__(self, q, k, v, pattern, *, q_offset=0, key_padding_mask=None):
        n_q, n_k = q.shape[-2], k.shape[-2]
        if key_padding_mask is None:
            block_mask = _flex_block_mask(pattern, n_q, n_k, q.device)
        else:
            block_mask = _flex_padded_block_mask(pattern, key_padding_mask, n_q, n_k)
        return self._attend(q, k, v, block_mask=block_mask)


def _flex_mask_mod(pattern: AttentionPattern):
    def mask_mod(b, h, q_idx, kv_idx):
        return pattern.allowed(q_idx, kv_idx)

    return mask_mod


@functools.lru_cache(maxsize=64)
def _flex_block_mask(pattern: AttentionPattern, n_q: int, n_k: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_flex_mask_mod(pattern), None, None, n_q, n_k, device=device)


def _flex_padded_block_mask(pattern: AttentionPattern, key_padding_mask: Tensor, n_q: int, n_k: int):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return pattern.allowed(q_idx, kv_idx) & key_padding_mask[b, kv_idx]

    batch = key_padding_mask.shape[0]
    return create_block_mask(mask_mod, batch, None, n_q, n_k, device=key_padding_mask.device)
