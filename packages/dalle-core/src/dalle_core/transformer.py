"""The causal transformer of DALLE: attention with per-layer patterns, token shift, rotary
positions, a preallocated key/value cache, and reversible or checkpointed layers.

Every layer works on a slice of the sequence: queries at positions ``offset .. offset + n - 1``
(training: the whole sequence, ``offset == 0``; cached generation: the new tokens). A
`LayerCache` holds what later positions need from earlier ones (keys, values, and the normed
inputs that token shift reads), so cached and uncached runs compute the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import cycle

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from dalle_core.attention.kernels import AttentionKernel, SDPAKernel
from dalle_core.attention.patterns import AttentionPattern
from dalle_core.layers import FeedForward, LayerScale, PreNorm, dropout_layer
from dalle_core.reversible import ReversibleSequence


@dataclass
class ForwardContext:
    """What every layer needs to know about the current slice of the sequence."""

    offset: int
    key_padding_mask: Tensor | None  # [B, offset + n] bool, True = keep; None = keep all
    rotary: tuple[Tensor, Tensor, int] | None  # cos, sin [n, D] for positions offset.., rot
    rotate_values: bool = False  # rotary rotates the values too (upstream's rotary)


@dataclass
class BranchCache:
    """Per-branch cache: keys and values ``kv [2, B, H, N, D]`` (attention; one tensor, so that
    a generation step stores a position's key and value with one copy, and keys first so that
    each of the two is contiguous for the step's matrix products) and normed inputs
    ``[B, N + 1, dim]`` (token shift; the last row stays zero); either ``None`` when the branch
    does not need it."""

    kv: Tensor | None = None
    shifted_inputs: Tensor | None = None

    @property
    def k(self) -> Tensor:
        """Keys ``[B, H, N, D]`` (a view)."""
        return self.kv[0]

    @property
    def v(self) -> Tensor:
        """Values ``[B, H, N, D]`` (a view)."""
        return self.kv[1]


@dataclass
class LayerCache:
    attn: BranchCache
    ff: BranchCache


class KernelSelector:
    """Resolves ``attn_kernel`` (a registered name or ``"auto"``) to a kernel per call.

    A named kernel is created at construction, so a name whose plugin is not installed fails
    there, saying which package to install. Where it cannot serve a call (e.g. a cached call at
    an offset for ``flex``), the dense SDPA kernel does. ``auto`` picks the usable kernel
    with the highest priority. Choices are cached per (pattern, device, dtype, grad, decoding).
    """

    def __init__(self, name: str, patterns: set[str]):
        from dalle_core.plugins import create_attention_kernel

        self.name = name  # as asked: a registered name or auto
        self.fallback = SDPAKernel()
        self.fixed: AttentionKernel | None = None
        if name != "auto":
            self.fixed = create_attention_kernel(name)
            unsupported = sorted(patterns - set(self.fixed.patterns))
            if unsupported:
                raise ValueError(
                    f"attn_kernel '{name}' does not support attention type(s) {unsupported}; "
                    f"it supports {sorted(self.fixed.patterns)}; use attn_kernel='auto'"
                )
        self._choices: dict[tuple, AttentionKernel] = {}

    def select(self, pattern: str, q: Tensor, decoding: bool) -> AttentionKernel:
        key = (pattern, q.device.type, q.dtype, q.requires_grad, decoding)
        kernel = self._choices.get(key)
        if kernel is None:
            kernel = self.choose(*key)
            self._choices[key] = kernel
        return kernel

    def choose(
        self, pattern: str, device_type: str, dtype: torch.dtype, needs_grad: bool, decoding: bool
    ) -> AttentionKernel:
        """The kernel for calls of this kind (uncached; `select` caches it per call kind)."""
        if self.fixed is not None:
            usable = self.fixed.supports(pattern, device_type, dtype, needs_grad, decoding)
            return self.fixed if usable else self.fallback
        from dalle_core.plugins import usable_attention_kernels

        candidates = [
            kernel
            for kernel in usable_attention_kernels()
            if kernel.supports(pattern, device_type, dtype, needs_grad, decoding)
        ]
        if not candidates:
            return self.fallback
        return max(candidates, key=lambda kernel: kernel.priority(pattern, device_type))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, rot: int) -> Tensor:
    """Rotate the first ``rot`` features of ``x [..., n, D]`` by position with `rotary_tables`'
    ``cos, sin [n, D]``: ``x * cos + (x2, x1, x_pass) * sin`` for ``x = (x1, x2, x_pass)``
    (halves of the rotated features, then the rest). ``-sin`` rotates back."""
    half = rot // 2
    swapped = torch.cat((x[..., half:rot], x[..., :half], x[..., rot:]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


class _SplitRotatedQKV(torch.autograd.Function):
    """``qkv [3, B, H, n, D]`` -> q, k (rotated by `apply_rotary`) and v ``[B, H, n, D]``; v is
    rotated too with ``rotate_values``.

    The backward rotates the gradients of what was rotated back (the rotation is orthogonal:
    ``-sin``) and writes all three into one tensor. Autograd's own backward of the slices
    zero-filled a qkv-sized tensor per slice and summed them: forward and backward took about
    4.5 ms per layer of the benchmark's config A step, against about 2.5 ms now.
    """

    @staticmethod
    def forward(autograd_ctx, qkv: Tensor, cos: Tensor, sin: Tensor, rot: int, rotate_values: bool):
        rotated = 3 if rotate_values else 2  # q, k (, v)
        autograd_ctx.save_for_backward(cos, sin)
        autograd_ctx.rot, autograd_ctx.rotated = rot, rotated
        return (*apply_rotary(qkv[:rotated], cos, sin, rot).unbind(0), *qkv[rotated:].unbind(0))

    @staticmethod
    @once_differentiable
    def backward(autograd_ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor):
        cos, sin = autograd_ctx.saved_tensors
        rotated = autograd_ctx.rotated
        grads = (grad_q, grad_k, grad_v)
        grad = torch.empty((3, *grad_v.shape), dtype=grad_v.dtype, device=grad_v.device)
        grad[:rotated] = apply_rotary(torch.stack(grads[:rotated]), cos, -sin, autograd_ctx.rot)
        if rotated < 3:
            grad[2] = grad_v
        return grad, None, None, None, None


def split_qkv(
    qkv: Tensor, rotary: tuple[Tensor, Tensor, int] | None, rotate_values: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv [3, B, H, n, D]`` -> q, k, v ``[B, H, n, D]``, q and k (and v with
    ``rotate_values``) rotated when ``rotary`` (``cos, sin [n, D], rot``) is given."""
    if rotary is None:
        return qkv.unbind(0)
    return _SplitRotatedQKV.apply(qkv, *rotary, rotate_values)


def rotary_angles(dim_head: int, text_len: int, fmap_size: int, upstream: bool = False) -> Tensor:
    """Rotation angles ``[seq_len, rot_dim]`` for DALLE's three rotary axes (half-split layout).

    A third of the head's features each rotate by text position, image row and image column.
    Image codes share one text position far beyond the text; text sits far outside the image
    grid (which spans [-1, 1]) on both image axes, as in the upstream project. The text
    frequencies' exponents are divided by the rotated features per axis, ``part``, or with
    ``upstream`` by ``dim_head // 3`` as upstream did (one more than ``part`` when it is odd).
    """
    part = (dim_head // 3) // 2 * 2
    if part == 0:
        raise ValueError(f"rotary_emb needs dim_head >= 6, got {dim_head}")
    image_len = fmap_size**2
    seq_len = text_len + image_len - 1
    positions = torch.arange(seq_len)
    is_text = positions < text_len
    image_index = (positions - text_len).clamp(min=0)
    grid = torch.linspace(-1.0, 1.0, fmap_size)
    text_pos = torch.where(is_text, positions, torch.full_like(positions, 8192)).float()
    row_pos = torch.where(is_text, torch.tensor(-10.0), grid[image_index // fmap_size])
    col_pos = torch.where(is_text, torch.tensor(-10.0), grid[image_index % fmap_size])
    text_dim = dim_head // 3 if upstream else part
    text_freqs = 1.0 / (10000 ** (torch.arange(0, part, 2).float() / text_dim))
    pixel_freqs = torch.linspace(1.0, 5.0, part // 2) * math.pi
    angles = torch.cat(
        (
            text_pos[:, None] * text_freqs,
            row_pos[:, None] * pixel_freqs,
            col_pos[:, None] * pixel_freqs,
        ),
        dim=-1,
    )  # [seq_len, 3 * part / 2]
    return torch.cat((angles, angles), dim=-1)  # [seq_len, 3 * part]


def rotary_tables(
    dim_head: int, text_len: int, fmap_size: int, upstream: bool = False
) -> tuple[Tensor, Tensor, int]:
    """``cos, sin [seq_len, dim_head]`` and ``rot``, the number of rotated features, for
    `apply_rotary` (``upstream``: `rotary_angles`' upstream text frequencies).

    With the rotated features ``(x1, x2)`` (halves) and the rest ``x_pass``, the rotation is
    ``(x1 cos - x2 sin, x2 cos + x1 sin, x_pass)``: ``sin`` carries the signs (and 0 on
    ``x_pass``), ``cos`` is 1 on ``x_pass``.
    """
    angles = rotary_angles(dim_head, text_len, fmap_size, upstream)  # [seq_len, rot]
    seq_len, rot = angles.shape
    half = rot // 2
    cos = torch.ones(seq_len, dim_head)
    cos[:, :rot] = angles.cos()
    sin = torch.zeros(seq_len, dim_head)
    sin[:, :half] = -angles[:, :half].sin()
    sin[:, half:rot] = angles[:, half:].sin()
    return cos, sin, rot


def _shifted(
    history: Tensor, x: Tensor, index_a: Tensor, index_b: Tensor, keep_a: Tensor, keep_b: Tensor
) -> Tensor:
    """Token shift of ``x [B, n, dim]``: its first quarter of features from ``history``'s
    positions ``index_a [n]`` (times ``keep_a [n, 1]``, 0 where there is no neighbour), the
    second quarter from ``index_b``, the rest its own."""
    q = x.shape[-1] // 4
    part_a = history[..., :q].index_select(1, index_a) * keep_a
    part_b = history[..., q : 2 * q].index_select(1, index_b) * keep_b
    return torch.cat((part_a, part_b, x[..., 2 * q :]), dim=-1)


class _ShiftSequence(torch.autograd.Function):
    """`_shifted` of a whole sequence (the history is ``x`` itself), with a backward that
    scatters into one gradient tensor; autograd's own zero-filled one per slice and gather."""

    @staticmethod
    def forward(autograd_ctx, x, index_a, index_b, keep_a, keep_b):
        autograd_ctx.save_for_backward(index_a, index_b, keep_a, keep_b)
        return _shifted(x, x, index_a, index_b, keep_a, keep_b)

    @staticmethod
    @once_differentiable
    def backward(autograd_ctx, grad: Tensor):
        index_a, index_b, keep_a, keep_b = autograd_ctx.saved_tensors
        q = grad.shape[-1] // 4
        grad_x = torch.empty_like(grad)  # [B, n, dim]
        grad_x[..., : 2 * q].zero_()
        grad_x[..., 2 * q :] = grad[..., 2 * q :]
        grad_x[..., :q].index_add_(1, index_a, grad[..., :q] * keep_a)
        grad_x[..., q : 2 * q].index_add_(1, index_b, grad[..., q : 2 * q] * keep_b)
        return grad_x, None, None, None, None


class TokenShift(nn.Module):
    """Mixes in features of neighbouring tokens (upstream ``shift_tokens``).

    Text: the first half of the features comes from the previous token. Image: the first
    quarter from the code above, the second quarter from the code to the left (zeros at the
    edges). Index tables ``[seq_len]`` make it one gather over a whole sequence (or any slice
    of it); `gather_index` serves the one-token steps of cached generation.
    """

    def __init__(self, dim: int, text_len: int, fmap_size: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"shift_tokens needs dim divisible by 4, got {dim}")
        self.quarter = dim // 4
        seq_len = text_len + fmap_size**2 - 1
        positions = torch.arange(seq_len)
        image_index = positions - text_len
        row, col = image_index // fmap_size, image_index % fmap_size
        is_text = positions < text_len
        previous = positions - 1
        above = torch.where(row > 0, positions - fmap_size, -1)
        left = torch.where(col > 0, positions - 1, -1)
        sources = (torch.where(is_text, previous, above), torch.where(is_text, previous, left))  # [seq_len]
        self.register_buffer("index_a", sources[0].clamp(min=0), persistent=False)
        self.register_buffer("index_b", sources[1].clamp(min=0), persistent=False)
        self.register_buffer("keep_a", (sources[0] >= 0).float()[:, None], persistent=False)  # [seq_len, 1]
        self.register_buffer("keep_b", (sources[1] >= 0).float()[:, None], persistent=False)

    def forward(self, x: Tensor, ctx: ForwardContext, cache: BranchCache | None) -> Tensor:
        n = x.shape[1]  # x [B, n, dim]
        start, end = ctx.offset, ctx.offset + n
        tables = (
            self.index_a[start:end], self.index_b[start:end],
            self.keep_a[start:end].to(x.dtype), self.keep_b[start:end].to(x.dtype),
        )
        if cache is None:
            if torch.is_grad_enabled() and x.requires_grad:
                return _ShiftSequence.apply(x, *tables)
            return _shifted(x, x, *tables)
        cache.shifted_inputs[:, start:end] = x
        return _shifted(cache.shifted_inputs[:, :end], x, *tables)  # history [B, offset + n, dim]

    def gather_index(self, max_len: int) -> Tensor:
        """Per position ``p < max_len``, where its shifted features sit in a cached history
        ``[B, max_len + 1, dim]`` flattened to ``[B, (max_len + 1) * dim]``: ``[max_len, dim]``
        flat indices. A missing neighbour reads row ``max_len``, which `Transformer.new_cache`
        keeps at zero."""
        dim, q = 4 * self.quarter, self.quarter
        missing = torch.tensor(max_len, device=self.index_a.device)
        source_a = torch.where(self.keep_a[:max_len, 0] > 0, self.index_a[:max_len], missing)
        source_b = torch.where(self.keep_b[:max_len, 0] > 0, self.index_b[:max_len], missing)
        features = torch.arange(dim, device=missing.device)
        own = torch.arange(len(source_a), device=missing.device)
        rows = torch.where(
            features < q, source_a[:, None], torch.where(features < 2 * q, source_b[:, None], own[:, None])
        )  # [max_len, dim]: the position each feature comes from
        return rows * dim + features


class Attention(nn.Module):
    """Multi-head causal attention over one `AttentionPattern`; the kernel comes per call."""

    def __init__(
        self, dim: int, pattern: AttentionPattern, heads: int, dim_head: int, dropout: float,
        kernels: KernelSelector,
    ):
        super().__init__()
        self.pattern, self.heads, self.dim_head, self.kernels = pattern, heads, dim_head, kernels
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), dropout_layer(dropout))

    def forward(self, x: Tensor, ctx: ForwardContext, cache: BranchCache | None) -> Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, H, n, D]
        q, k, v = split_qkv(qkv, ctx.rotary, ctx.rotate_values)
        if cache is not None:
            end = ctx.offset + n
            cache.k[:, :, ctx.offset : end] = k
            cache.v[:, :, ctx.offset : end] = v
            k, v = cache.k[:, :, :end], cache.v[:, :, :end]  # [B, H, offset + n, D]
        decoding = ctx.offset > 0  # the queries start after position 0 (a cached step)
        kernel = self.kernels.select(self.pattern.kind, q, decoding)
        out = kernel(q, k, v, self.pattern, q_offset=ctx.offset, key_padding_mask=ctx.key_padding_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # [B, n, dim]


class Shifted(nn.Module):
    """Token shift (optional) in front of a branch; passes the context to attention only."""

    def __init__(self, fn: nn.Module, shift: TokenShift | None):
        super().__init__()
        self.fn, self.shift = fn, shift

    def forward(self, x: Tensor, ctx: ForwardContext, cache: BranchCache | None) -> Tensor:
        if self.shift is not None:
            x = self.shift(x, ctx, cache)
        if isinstance(self.fn, Attention):
            return self.fn(x, ctx, cache)
        return self.fn(x)


class Transformer(nn.Module):
    """``depth`` pre-norm layers of (attention, GEGLU feed-forward), each branch layer-scaled.

    ``attn_types`` cycles over the layers; ``shared_attn_ids`` / ``shared_ff_ids`` (cycled too)
    make layers with the same id share one attention / feed-forward module (shared attention
    must have the same type). ``upstream_rotary`` (with ``rotary_emb``): rotate the values too and
    use upstream's text frequencies (`rotary_angles`), as the upstream project's rotary did.
    """

    def __init__(
        self, *, dim: int, depth: int, text_len: int, fmap_size: int, heads: int, dim_head: int,
        attn_dropout: float, ff_dropout: float, attn_types: tuple[str, ...], attn_kernel: str,
        sandwich_norm: bool, shift_tokens: bool, rotary_emb: bool, reversible: bool,
        activation_checkpointing: bool, shared_attn_ids=None, shared_ff_ids=None,
        upstream_rotary: bool = False,
    ):
        super().__init__()
        self.patterns = [
            AttentionPattern(kind, text_len, fmap_size) for kind, _ in zip(cycle(attn_types), range(depth))
        ]
        self.kernels = KernelSelector(attn_kernel, {p.kind for p in self.patterns})
        attn_ids = cycle(shared_attn_ids if shared_attn_ids is not None else range(depth))
        ff_ids = cycle(shared_ff_ids if shared_ff_ids is not None else range(depth))
        shared_attn: dict = {}
        shared_ff: dict = {}
        self.shift = TokenShift(dim, text_len, fmap_size) if shift_tokens else None
        self.attn_branches, self.ff_branches = nn.ModuleList(), nn.ModuleList()
        for index, (pattern, attn_id, ff_id) in enumerate(zip(self.patterns, attn_ids, ff_ids)):
            if attn_id not in shared_attn:
                attn = Attention(dim, pattern, heads, dim_head, attn_dropout, self.kernels)
                shared_attn[attn_id] = attn
            attn = shared_attn[attn_id]
            if attn.pattern.kind != pattern.kind:
                raise ValueError(
                    f"layer {index} shares attention id {attn_id!r} with a '{attn.pattern.kind}' "
                    f"layer but is '{pattern.kind}': attn_types do not match shared_attn_ids"
                )
            ff = shared_ff.setdefault(ff_id, FeedForward(dim, dropout=ff_dropout))
            self.attn_branches.append(
                LayerScale(dim, index + 1, PreNorm(dim, Shifted(attn, self.shift), sandwich_norm))
            )
            self.ff_branches.append(
                LayerScale(dim, index + 1, PreNorm(dim, Shifted(ff, self.shift), sandwich_norm))
            )
        self.heads, self.dim_head, self.dim = heads, dim_head, dim
        self.reversible = ReversibleSequence(self.attn_branches, self.ff_branches) if reversible else None
        self.activation_checkpointing = activation_checkpointing
        if upstream_rotary and not rotary_emb:
            raise ValueError("upstream_rotary=True changes the rotary embedding: it needs rotary_emb=True")
        self.upstream_rotary = upstream_rotary
        if rotary_emb:
            cos, sin, self.rotary_features = rotary_tables(dim_head, text_len, fmap_size, upstream_rotary)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        else:
            self.rotary_cos = self.rotary_sin = None

    def new_cache(self, batch: int, max_len: int, like: Tensor) -> list[LayerCache]:
        """Preallocate a cache for ``batch`` rows of up to ``max_len`` positions: keys and values
        start at zero (a generation step attends over the whole cache, where those not yet
        written weigh nothing; garbage there could be NaN, and 0 * NaN is NaN), and token shift's
        history has one more row, of zeros, for `TokenShift.gather_index`."""
        def branch(attention: bool) -> BranchCache:
            kv = like.new_zeros(2, batch, self.heads, max_len, self.dim_head) if attention else None
            history = None
            if self.shift is not None:
                history = like.new_empty(batch, max_len + 1, self.dim)
                history[:, max_len].zero_()
            return BranchCache(kv=kv, shifted_inputs=history)

        return [LayerCache(branch(True), branch(False)) for _ in self.attn_branches]

    def context(self, offset: int, n: int, key_padding_mask: Tensor | None) -> ForwardContext:
        rotary = None
        if self.rotary_cos is not None:
            end = offset + n
            rotary = (self.rotary_cos[offset:end], self.rotary_sin[offset:end], self.rotary_features)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, : offset + n]
        return ForwardContext(offset, key_padding_mask, rotary, self.upstream_rotary)

    def forward(
        self, x: Tensor, *, offset: int = 0, key_padding_mask: Tensor | None = None,
        cache: list[LayerCache] | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """``x [B, n, dim]`` at positions ``offset ..`` -> ``[B, n, dim]``.

        ``last_only``: return ``[B, 1, dim]``, the last position's output, as a generation
        prefill needs; with a ``cache`` the last feed-forward then runs for that position alone
        (the others' keys, values and token-shift inputs are still cached).
        """
        ctx = self.context(offset, x.shape[1], key_padding_mask)
        if self.reversible is not None:
            x = self.reversible(x, ctx, cache)
            return x[:, -1:] if last_only else x
        last = len(self.attn_branches) - 1
        for index, (attn, ff) in enumerate(zip(self.attn_branches, self.ff_branches)):
            layer_cache = cache[index] if cache is not None else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self._layer, attn, ff, x, ctx, layer_cache, use_reentrant=False)
            elif last_only and index == last and layer_cache is not None:
                return self._last_position_layer(attn, ff, x, ctx, layer_cache)
            else:
                x = self._layer(attn, ff, x, ctx, layer_cache)
        return x[:, -1:] if last_only else x

    @staticmethod
    def _layer(attn, ff, x, ctx, layer_cache: LayerCache | None) -> Tensor:
        x = x + attn(x, ctx=ctx, cache=layer_cache.attn if layer_cache else None)
        return x + ff(x, ctx=ctx, cache=layer_cache.ff if layer_cache else None)

    def _last_position_layer(self, attn, ff, x, ctx, layer_cache: LayerCache) -> Tensor:
        """`_layer` for ``x [B, n, dim]`` -> its last position ``[B, 1, dim]``: attention for
        every position, the feed-forward for the last one (the others' normed inputs go to the
        token-shift history, where later positions read them)."""
        x = x + attn(x, ctx=ctx, cache=layer_cache.attn)
        n = x.shape[1]
        history = layer_cache.ff.shifted_inputs
        if history is not None:
            history[:, ctx.offset : ctx.offset + n - 1] = ff.fn.norm(x[:, :-1])
        last = x[:, -1:]
        return last + ff(last, ctx=self.context(ctx.offset + n - 1, 1, None), cache=layer_cache.ff)
