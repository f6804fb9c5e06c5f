"""Cached image generation with the one-token step compiled ahead of time (``compile=True``).

`DecodeStep` is eager PyTorch: about 80 operators a step, each paying dispatch, and matrix
products that read weights laid out for training. `PositionStep` computes the same function
with the position as a tensor, so that one graph serves every position: cache writes are
``index_copy_`` at the position, token shift and rotary read their per-position tables with
``index_select``, and attention runs over the whole preallocated cache under the pattern's mask
row for the position (masked keys weigh exactly zero), written as elementwise products, sums
and a softmax that the compiler fuses into one kernel (the SDPA kernel cost more per call, 111
against 48 us, than all the arithmetic of one query). The graph ends in the image logits.

`compiled_step` exports it (``torch.export``) and compiles it with AOTInductor, freezing the
model's weights into the compiled artifact: products become C++ GEMM kernels over weights
packed once for few rows, and the operators between them fuse into a few kernels a layer.
Compiling takes tens of seconds (30 to 40 s for the benchmark's config A on 2 cores), so it is
opt-in. Compiled steps are kept per model and call shape, and dropped when a parameter or saved
buffer of the model changes through PyTorch (an optimizer step, ``load_state_dict``), since
their weights are copies; writes through ``.data`` bypass the version counters this reads.
They are also kept on disk (`dalle_core.step_cache`), keyed by the weights and the call shape,
so that another process generating from the same model loads the package instead of compiling.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core import step_cache
from dalle_core.decode_step import qkv_rotations
from dalle_core.layers import LayerScale
from dalle_core.transformer import Attention, LayerCache

if TYPE_CHECKING:
    from dalle_core.dalle import DALLE

logger = logging.getLogger(__name__)


class PositionStep(nn.Module):
    """``x [rows, dim]`` of one new token per row at ``position [1]`` (int64) -> image logits
    ``[rows, num_image_tokens]``, reading and extending the caches like `DecodeStep` (eval mode).

    ``key_padding_mask [rows, max_len]`` (True = keep); ``kv``: each layer's ``[rows, 2, H,
    max_len, D]``; ``history``: token shift's normed inputs ``[rows, max_len + 1, dim]`` per
    branch (attention, feed-forward, layer by layer), empty without token shift.
    """

    def __init__(self, model: DALLE, max_len: int):
        super().__init__()
        self.model = model
        transformer = model.transformer
        like = next(transformer.parameters())
        if transformer.shift is not None:
            self.register_buffer("shift_index", transformer.shift.gather_index(max_len))  # [max_len, dim]
        self.rotary = transformer.rotary_cos is not None
        if self.rotary:
            rotation = qkv_rotations(transformer, 0, max_len, like.dtype)  # [max_len, 3, D, D]
            self.register_buffer("rotation", rotation)
        for pattern in transformer.patterns:  # per pattern: [max_len, max_len], True = attend
            name = f"mask_{pattern.kind}"
            if not hasattr(self, name):
                self.register_buffer(name, pattern.dense_mask(max_len, max_len, 0, like.device))

    def forward(
        self, x: Tensor, position: Tensor, key_padding_mask: Tensor, kv: list[Tensor], history: list[Tensor]
    ) -> Tensor:
        transformer = self.model.transformer
        shift = self.shift_index.index_select(0, position).view(-1) if history else None  # [dim]
        rotation = self.rotation.index_select(0, position)[0] if self.rotary else None  # [3, D, D]
        layers = zip(transformer.attn_branches, transformer.ff_branches)
        branch_args = []
        for index, (attn, ff) in enumerate(layers):
            attn_history = history[2 * index] if history else None
            ff_history = history[2 * index + 1] if history else None
            branch_args.append(((attn, attn_history, kv[index]), (ff, ff_history, None)))
        context = (position, key_padding_mask, shift, rotation)
        if transformer.reversible is not None:  # y1 = x1 + f(x2), y2 = x2 + g(y1), output (y1 + y2) / 2
            y1 = y2 = x
            for attn_args, ff_args in branch_args:
                y1 = self._branch(*attn_args, y2, y1, *context)
                y2 = self._branch(*ff_args, y1, y2, *context)
            x = (y1 + y2) / 2
        else:
            for attn_args, ff_args in branch_args:
                x = self._branch(*attn_args, x, x, *context)
                x = self._branch(*ff_args, x, x, *context)
        return self.model._image_logits(self.model._output_norm(x))

    def _branch(
        self, branch: LayerScale, history: Tensor | None, kv: Tensor | None, x: Tensor, residual: Tensor,
        position: Tensor, key_padding_mask: Tensor, shift: Tensor | None, rotation: Tensor | None,
    ) -> Tensor:
        """``residual + scale * norm_out(fn(shift(norm(x))))`` for ``x [rows, dim]``."""
        prenorm = branch.fn
        fn = prenorm.fn.fn  # Attention or FeedForward
        h = prenorm.norm(x)
        if history is not None:
            history.index_copy_(1, position, h[:, None])
            h = history.view(h.shape[0], -1).index_select(1, shift)
        if isinstance(fn, Attention):
            h = self._attend(fn, h, kv, position, key_padding_mask, rotation)
        else:  # the GEGLU feed-forward, as DecodeStep computes it
            values, gates = fn.proj_in(h).chunk(2, dim=-1)
            h = fn.proj_out(F.gelu(gates) * values)
        return residual + branch.scale * prenorm.norm_out(h)

    def _attend(
        self, fn: Attention, h: Tensor, kv: Tensor, position: Tensor, key_padding_mask: Tensor,
        rotation: Tensor | None,
    ) -> Tensor:
        rows = h.shape[0]
        qkv = fn.to_qkv(h).view(rows, 3, fn.heads, fn.dim_head)
        if rotation is not None:
            qkv = torch.matmul(qkv, rotation)  # rotate queries and keys, keep values
        kv.index_copy_(3, position, qkv[:, 1:, :, None])  # kv [rows, 2, H, max_len, D]
        allowed = getattr(self, f"mask_{fn.pattern.kind}").index_select(0, position) & key_padding_mask
        allowed = allowed[:, None, :, None]  # [rows, 1, max_len, 1]
        # one query per row: elementwise products and sums, which the compiler fuses into one
        # kernel (the SDPA kernel cost more per call than all the arithmetic). Positions not yet
        # written hold whatever memory held, NaN included: masked, never multiplied.
        scores = (kv[:, 0] * qkv[:, 0, :, None]).sum(-1, keepdim=True) * fn.dim_head**-0.5
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=2)  # [rows, H, max_len, 1]
        out = torch.where(allowed, weights * kv[:, 1], 0.0).sum(2)  # [rows, H, D]
        return fn.to_out(out.reshape(rows, -1))


def cache_tensors(cache: list[LayerCache]) -> tuple[list[Tensor], list[Tensor]]:
    """A cache's tensors as `PositionStep` takes them: ``kv`` per layer ``[rows, 2, H, max_len,
    D]``; token shift's histories per branch, attention then feed-forward, layer by layer."""
    kv = [layer.attn.kv for layer in cache]
    history = [
        branch.shifted_inputs for layer in cache for branch in (layer.attn, layer.ff)
        if branch.shifted_inputs is not None
    ]
    return kv, history


class CompiledStep:
    """A compiled `PositionStep` for one call shape; `bind` it to a call's cache."""

    def __init__(self, runner: Callable, max_len: int, device: torch.device):
        self.runner = runner
        self.positions = torch.arange(max_len, device=device)[:, None].unbind(0)  # per position: [1]

    def bind(
        self, cache: list[LayerCache], key_padding_mask: Tensor | None
    ) -> Callable[[Tensor, int], Tensor]:
        """``(x [rows, dim], position) -> logits [rows, num_image_tokens]`` over ``cache``."""
        kv, history = cache_tensors(cache)
        rows = kv[0].shape[0]
        if key_padding_mask is None:
            key_padding_mask = torch.ones(rows, len(self.positions), dtype=torch.bool, device=kv[0].device)
        key_padding_mask = key_padding_mask.contiguous()
        # the compiled code assumes the strides it was compiled for: contiguous
        return lambda x, position: self.runner(
            x.contiguous(), self.positions[position], key_padding_mask, kv, history
        )


# per model: the fingerprint of its weights, and its compiled steps by call shape
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_step(model: DALLE, cache: list[LayerCache], x: Tensor) -> CompiledStep:
    """The compiled step of ``model`` for calls shaped like ``x [rows, dim]`` over ``cache``
    (compiled on first use; again after the model's weights change)."""
    device = x.device
    if device.type != "cpu":
        raise ValueError(
            f"compile=True compiles the generation step for the CPU (C++ kernels); got a model on "
            f"{device.type}: generate there with compile=False"
        )
    if torch.is_autocast_enabled(device.type):
        raise ValueError("compile=True does not run under autocast: the compiled step keeps the model dtype")
    max_len = cache[0].attn.kv.shape[3]
    key = (x.shape[0], max_len, x.dtype, torch.get_num_threads())  # compiled code fixes its threads
    fingerprint = tuple((t.data_ptr(), t._version) for t in model.state_dict(keep_vars=True).values())
    known_fingerprint, steps = _COMPILED.get(model, (None, {}))
    if known_fingerprint != fingerprint:
        steps = {}
        _COMPILED[model] = (fingerprint, steps)
    if key not in steps:
        steps[key] = _compile(model, cache, x, max_len)
    return steps[key]


def _compile(model: DALLE, cache: list[LayerCache], x: Tensor, max_len: int) -> CompiledStep:
    """The step from the disk cache (`dalle_core.step_cache`), else compiled and kept there."""
    key = step_cache.step_key(
        model, rows=x.shape[0], max_len=max_len, dtype=x.dtype, threads=torch.get_num_threads()
    )
    runner = step_cache.load(key)
    if runner is None:
        runner = step_cache.store(key, lambda path: _export_and_compile(model, cache, x, max_len, path))
    return CompiledStep(runner, max_len, x.device)


def _export_and_compile(model: DALLE, cache: list[LayerCache], x: Tensor, max_len: int, path: Path) -> None:
    """Export `PositionStep` for calls shaped like ``x`` and compile it into the package ``path``."""
    started = time.perf_counter()
    logger.info("compiling the generation step (tens of seconds, once per model and batch shape)")
    step = PositionStep(model, max_len).eval()
    rows = x.shape[0]
    key_padding_mask = torch.ones(rows, max_len, dtype=torch.bool, device=x.device)
    kv, history = ([t.clone() for t in tensors] for tensors in cache_tensors(cache))  # export writes them
    position = torch.tensor([max_len - 1], device=x.device)
    x = torch.zeros_like(x, memory_format=torch.contiguous_format)
    with torch.no_grad():
        exported = torch.export.export(step, (x, position, key_padding_mask, kv, history))
        # inductor's C++ GEMM kernels (x86 vector units), or ATen's products elsewhere
        gemm = "CPP" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "ATEN"
        options = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": gemm}
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs=options)
    logger.info("compiled the generation step in %.1f s", time.perf_counter() - started)
