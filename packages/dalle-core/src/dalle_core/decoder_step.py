"""Cached generation's one-token step, written once: run eagerly, or compiled ahead of time.

`DecoderStep` computes what the transformer's forward computes for one new token per row at
sequence ``position`` (eval mode: no dropout), reading and extending the cache that the
prompt's forward filled (`Transformer.new_cache`), then the model's output norm and one head's
logits. The position is a tensor, so that one graph serves every position: cache writes are
``index_copy_`` at the position, token shift and rotary read per-position tables with
``index_select``, and attention runs over the whole preallocated cache under the position's row
of the pattern's mask, added to the scores as 0 or ``-inf``. The cache starts zeroed, so keys and
values not yet written weigh exactly zero.

The same module runs two ways (`decoder_step`):

- eagerly, the default: its matrix products read weights that oneDNN packed once per call for
  few rows (`Projections`), faster than ``F.linear`` for the few rows of a call, and each
  branch's weights and settings are unpacked from the modules once per call (`_Branch`), so that
  a step makes no module calls or lookups;
- compiled (``compile=True``): exported (``torch.export``) and compiled with AOTInductor on the
  CPU, with the model's weights frozen into C++ GEMM kernels packed for few rows and the
  operators between them fused, or captured as a CUDA graph on a GPU. A CPU compile takes tens
  of seconds; the package is kept on disk (`dalle_core.step_cache`) for every later process.
  Compiled steps are kept per model and call shape, and dropped when a parameter or saved buffer
  changes through PyTorch (an optimizer step, ``load_state_dict``), since their weights are
  copies; writes through ``.data`` bypass the version counters this reads.
"""

from __future__ import annotations

import functools
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
from dalle_core.layers import LayerScale
from dalle_core.transformer import Attention, LayerCache, Transformer

if TYPE_CHECKING:
    from dalle_core.dalle import DALLE

logger = logging.getLogger(__name__)

#: the rows oneDNN packs the eager step's weights for (see `Projections`)
PACK_ROWS = 16
#: the most weight bytes a call packs: the packed copy lives as long as the call, so a bigger
#: model generates through ``F.linear`` instead of doubling its weights' memory
PACK_MAX_BYTES = 2**30


class Projections:
    """``(h [rows, in], weight [out, in], bias [out] | None) -> h @ weight.T + bias``, as
    ``F.linear``, or from ``weight`` packed by oneDNN when ``pack`` (CPU, float32 or bfloat16)
    and the weights take at most ``PACK_MAX_BYTES``.

    For a few rows a product reads the whole weight for little arithmetic; oneDNN's packed
    layout reads it faster (config A's product shapes, 5 of them 4 times over, for 4 rows in a
    loop: about 690 us against 1,220 us through ``F.linear`` on the benchmark's 2 cores).
    Packed for ``PACK_ROWS`` rows whatever the rows of the call, the kernels do not change with
    the batch: a row's product has the same bits alone or batched.
    """

    def __init__(self, weights: list[Tensor], pack: bool):
        distinct = {id(weight): weight for weight in weights}.values()  # shared layers: once
        self.packed: dict[Tensor, Tensor] = {}
        if pack and sum(weight.numel() * weight.element_size() for weight in distinct) <= PACK_MAX_BYTES:
            self.packed = {
                weight: torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS) for weight in distinct
            }

    @staticmethod
    def packable(like: Tensor) -> bool:
        """Whether the products of a step for calls like ``like`` can be packed: on the CPU, in
        float32, or in bfloat16 where this CPU's oneDNN packs it (`_onednn_packs`)."""
        return (
            like.device.type == "cpu" and like.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")
            and _onednn_packs(like.dtype)
        )

    def __call__(self, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if not self.packed:  # as exported: the compiler packs the weights its own way
            return F.linear(h, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(h, self.packed[weight], bias, "none", [], "")


@functools.cache
def _onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and multiplies ``dtype`` weights on this CPU: bfloat16 needs
    AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and oneDNN refuses it elsewhere. Asked once per
    dtype, with a product of ones."""
    weight = torch.ones(2, 2, dtype=dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        row = torch.ones(1, 2, dtype=dtype)
        product = torch.ops.mkldnn._linear_pointwise(row, packed, None, "none", [], "")
    except RuntimeError as error:
        logger.info("oneDNN does not pack %s weights on this CPU (%s): the step uses F.linear", dtype, error)
        return False
    return bool((product == 2).all())


class DecoderStep(nn.Module):
    """``x [rows, dim]`` of one new token per row at ``position [1]`` (int64) -> logits
    ``[rows, vocabulary]`` of ``head`` (``"image"`` or ``"text"``), reading and extending the
    cache. Equal to the model's output for ``transformer(x[:, None], offset=position,
    cache=cache)`` in eval mode without gradients.

    ``padding [rows, max_len]``: 0 where a key may be attended, ``-inf`` on padded text (see
    `padding_bias`); ``kv``: each layer's ``[2, rows, H, max_len, D]``; ``history``: token
    shift's normed inputs ``[rows, max_len + 1, dim]`` per branch (attention, feed-forward,
    layer by layer), empty without token shift (see `cache_tensors`). ``pack``: run the
    products through packed weights (`Projections`; the eager step), else through ``F.linear``
    (what is exported and compiled).
    """

    def __init__(self, model: DALLE, max_len: int, head: str, pack: bool = False):
        super().__init__()
        self.model = model
        transformer: Transformer = model.transformer
        like = next(transformer.parameters())
        self.head = head
        if transformer.shift is not None:
            self.register_buffer("shift_index", transformer.shift.gather_index(max_len))  # [max_len, dim]
        self.rotary = transformer.rotary_cos is not None
        if self.rotary:  # `apply_rotary`'s tables per position for (q, k, v): [max_len, 3, 1, D]
            cos, sin = transformer.rotary_cos[:max_len], transformer.rotary_sin[:max_len]  # [max_len, D]
            values = (torch.ones_like(cos), torch.zeros_like(sin))  # values kept
            if transformer.upstream_rotary:
                values = (cos, sin)
            for name, table, value_table in (("cos", cos, values[0]), ("sin", sin, values[1])):
                qkv_table = torch.stack((table, table, value_table), dim=1)[:, :, None].to(like.dtype)
                self.register_buffer(f"rotary_{name}", qkv_table)
            rot, dim_head = transformer.rotary_features, cos.shape[1]
            half = rot // 2  # apply_rotary's swapped halves as one gather: [D] feature indices
            swap = torch.cat((torch.arange(half, rot), torch.arange(half), torch.arange(rot, dim_head)))
            self.register_buffer("rotary_swap", swap.to(cos.device))
        self.kinds = []
        for pattern in transformer.patterns:  # per pattern: [max_len, max_len], 0 = attend, -inf = not
            if pattern.kind not in self.kinds:
                allowed = pattern.dense_mask(max_len, max_len, 0, like.device)
                bias = torch.zeros(max_len, max_len, dtype=like.dtype, device=like.device)
                self.register_buffer(f"mask_{pattern.kind}", bias.masked_fill_(~allowed, float("-inf")))
                self.kinds.append(pattern.kind)
        self.layers = [  # per layer: its attention and feed-forward branches, unpacked once
            (_Branch(attn, 2 * index), _Branch(ff, 2 * index + 1))
            for index, (attn, ff) in enumerate(zip(transformer.attn_branches, transformer.ff_branches))
        ]
        self.reversible = transformer.reversible is not None
        weights = [model.head_weights(head)[0]]
        for attn, ff in self.layers:
            weights += [attn.project_in[0], attn.project_out[0], ff.project_in[0], ff.project_out[0]]
        self.linear = Projections(weights, pack)

    def forward(
        self, x: Tensor, position: Tensor, padding: Tensor, kv: list[Tensor], history: list[Tensor]
    ) -> Tensor:
        shift = self.shift_index.index_select(0, position).view(-1) if history else None  # [dim]
        rotation = None
        if self.rotary:  # cos, sin [3, 1, D]
            rotation = (
                self.rotary_cos.index_select(0, position)[0], self.rotary_sin.index_select(0, position)[0]
            )
        scores_bias = {  # per pattern: [rows, 1, 1, max_len], 0 = attend, -inf = not
            kind: (getattr(self, f"mask_{kind}").index_select(0, position) + padding)[:, None, None]
            for kind in self.kinds
        }
        context = (position, history, shift, rotation, scores_bias)
        if self.reversible:  # y1 = x1 + f(x2), y2 = x2 + g(y1), output (y1 + y2) / 2
            y1 = y2 = x
            for (attn, ff), layer_kv in zip(self.layers, kv):
                y1 = self._branch(attn, layer_kv, y2, y1, *context)
                y2 = self._branch(ff, None, y1, y2, *context)
            x = (y1 + y2) / 2
        else:
            for (attn, ff), layer_kv in zip(self.layers, kv):
                x = self._branch(attn, layer_kv, x, x, *context)
                x = self._branch(ff, None, x, x, *context)
        return self.linear(self.model._output_norm(x), *self.model.head_weights(self.head))

    def _branch(
        self, branch: _Branch, kv: Tensor | None, x: Tensor, residual: Tensor, position: Tensor,
        history: list[Tensor], shift: Tensor | None, rotation: tuple[Tensor, Tensor] | None,
        scores_bias: dict[str, Tensor],
    ) -> Tensor:
        """``residual + scale * norm_out(fn(shift(norm(x))))`` for ``x [rows, dim]``."""
        h = F.layer_norm(x, *branch.norm)
        if history:  # this branch's history [rows, max_len + 1, dim]
            branch_history = history[branch.history]
            branch_history.index_copy_(1, position, h[:, None])
            h = branch_history.view(h.shape[0], -1).index_select(1, shift)
        if branch.kind is not None:
            h = self._attend(branch, h, kv, position, rotation, scores_bias[branch.kind])
        else:  # the GEGLU feed-forward
            values, gates = self.linear(h, *branch.project_in).chunk(2, dim=-1)
            h = self.linear(F.gelu(gates) * values, *branch.project_out)
        if branch.norm_out is not None:
            h = F.layer_norm(h, *branch.norm_out)
        return torch.addcmul(residual, h, branch.scale)

    def _attend(
        self, branch: _Branch, h: Tensor, kv: Tensor, position: Tensor,
        rotation: tuple[Tensor, Tensor] | None, scores_bias: Tensor,
    ) -> Tensor:
        rows = h.shape[0]
        qkv = self.linear(h, *branch.project_in).view(rows, 3, branch.heads, -1)  # [rows, 3, H, D]
        if rotation is not None:  # `apply_rotary` of queries and keys (values with upstream_rotary)
            cos, sin = rotation
            qkv = torch.addcmul(qkv * cos, qkv.index_select(-1, self.rotary_swap), sin)
        kv.index_copy_(3, position, qkv[:, 1:, :, None].transpose(0, 1))  # kv [2, rows, H, max_len, D]
        scores = torch.matmul(qkv[:, 0, :, None], kv[0].transpose(2, 3))  # [rows, H, 1, max_len]
        weights = torch.add(scores_bias, scores, alpha=branch.scores_scale).softmax(dim=-1)
        out = torch.matmul(weights, kv[1])  # [rows, H, 1, D]
        return self.linear(out.view(rows, -1), *branch.project_out)


class _Branch:
    """One residual branch, LayerScale(PreNorm(Shifted(attention or feed-forward))), as the
    step reads it: ``F.layer_norm``'s arguments, the LayerScale factor, the two products'
    (weight, bias), and for attention its pattern, heads and score scale. Unpacked once per step
    object, so that a step reads plain attributes instead of module lookups; the tensors are the
    module's own (no copies)."""

    def __init__(self, branch: LayerScale, history: int):
        prenorm = branch.fn
        fn = prenorm.fn.fn  # Attention or FeedForward
        self.history = history  # its index among token shift's histories (see `cache_tensors`)
        self.norm = _layer_norm_args(prenorm.norm)
        self.norm_out = _layer_norm_args(prenorm.norm_out) if prenorm.sandwich else None
        self.scale = branch.scale  # [dim]
        self.kind = None
        if isinstance(fn, Attention):
            self.kind, self.heads, self.scores_scale = fn.pattern.kind, fn.heads, fn.dim_head**-0.5
            self.project_in = (fn.to_qkv.weight, None)
            self.project_out = (fn.to_out[0].weight, fn.to_out[0].bias)
        else:
            self.project_in = (fn.proj_in.weight, fn.proj_in.bias)
            self.project_out = (fn.proj_out.weight, fn.proj_out.bias)


def _layer_norm_args(norm: nn.LayerNorm) -> tuple:
    """``F.layer_norm``'s arguments after the input, for ``norm``."""
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps


def cache_tensors(cache: list[LayerCache]) -> tuple[list[Tensor], list[Tensor]]:
    """A cache's tensors as `DecoderStep` takes them: ``kv`` per layer ``[2, rows, H, max_len,
    D]``; token shift's histories per branch, attention then feed-forward, layer by layer."""
    kv = [layer.attn.kv for layer in cache]
    history = [
        branch.shifted_inputs for layer in cache for branch in (layer.attn, layer.ff)
        if branch.shifted_inputs is not None
    ]
    return kv, history


#: ``(x, position [1], padding, kv, history) -> logits``: a `DecoderStep`, eager or compiled
Runner = Callable[[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]], Tensor]


def bind(
    runner: Runner, cache: list[LayerCache], key_padding_mask: Tensor | None
) -> Callable[[Tensor, int], Tensor]:
    """``(x [rows, dim], position) -> logits [rows, vocabulary]``: ``runner`` over ``cache``."""
    kv, history = cache_tensors(cache)
    rows, max_len, device = kv[0].shape[1], kv[0].shape[3], kv[0].device
    padding = padding_bias(key_padding_mask, rows, max_len, kv[0])  # once per call, not per step
    positions = torch.arange(max_len, device=device)[:, None].unbind(0)  # per position: [1]
    return lambda x, position: runner(x.contiguous(), positions[position], padding, kv, history)


def padding_bias(key_padding_mask: Tensor | None, rows: int, max_len: int, like: Tensor) -> Tensor:
    """``key_padding_mask [rows, max_len]`` (True = keep; None = keep all) as the step adds it to
    its scores: ``[rows, max_len]`` of ``like``'s dtype and device, 0 = keep, ``-inf`` = padded
    (contiguous: compiled code assumes the strides it was compiled for)."""
    padding = torch.zeros(rows, max_len, dtype=like.dtype, device=like.device)
    if key_padding_mask is not None:
        padding.masked_fill_(~key_padding_mask, float("-inf"))
    return padding


def decoder_step(
    model: DALLE, cache: list[LayerCache], key_padding_mask: Tensor | None, like: Tensor, head: str,
    compile: bool = False,
) -> Callable[[Tensor, int], Tensor]:
    """Cached generation's step over ``cache`` (filled by the prompt's forward) for calls shaped
    like ``like [rows, dim]``: ``(x [rows, dim], position) -> logits [rows, vocabulary]`` of
    ``head``; eager with packed weights, or ``compile``d (`compiled_runner`)."""
    max_len = cache[0].attn.kv.shape[3]
    if compile:
        runner = compiled_runner(model, cache, like, head)
    else:
        runner = DecoderStep(model, max_len, head, pack=Projections.packable(like))
    return bind(runner, cache, key_padding_mask)


# per model: the fingerprint of its weights, and its compiled steps by call shape
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_runner(model: DALLE, cache: list[LayerCache], x: Tensor, head: str) -> Runner:
    """The compiled step of ``model`` for calls shaped like ``x [rows, dim]`` over ``cache``:
    AOTInductor on the CPU (kept on disk, `dalle_core.step_cache`), a CUDA graph on a GPU
    (`_cuda_graph_runner`); made on first use, again after the model's weights change."""
    if torch.is_autocast_enabled(x.device.type):
        raise ValueError("compile=True does not run under autocast: the compiled step keeps the model dtype")
    max_len = cache[0].attn.kv.shape[3]
    if x.device.type == "cuda":
        return _cuda_graph_runner(DecoderStep(model, max_len, head), x, cache)
    if x.device.type != "cpu":
        raise ValueError(
            f"compile=True compiles the generation step for the CPU (C++ kernels) or a CUDA GPU (a CUDA "
            f"graph); got a model on {x.device.type}: generate there with compile=False"
        )
    key = (x.shape[0], max_len, x.dtype, torch.get_num_threads(), head)  # compiled code fixes its threads
    fingerprint = tuple((t.data_ptr(), t._version) for t in model.state_dict(keep_vars=True).values())
    known_fingerprint, steps = _COMPILED.get(model, (None, {}))
    if known_fingerprint != fingerprint:
        steps = {}
        _COMPILED[model] = (fingerprint, steps)
    if key not in steps:
        steps[key] = _load_or_compile(model, cache, x, max_len, head)
    return steps[key]


def _load_or_compile(model: DALLE, cache: list[LayerCache], x: Tensor, max_len: int, head: str) -> Runner:
    """The step from the disk cache (`dalle_core.step_cache`), else compiled and kept there."""
    key = step_cache.step_key(
        model, rows=x.shape[0], max_len=max_len, dtype=x.dtype, threads=torch.get_num_threads(), head=head
    )
    runner = step_cache.load(key)
    if runner is None:
        runner = step_cache.store(key, lambda path: _export_and_compile(model, cache, x, max_len, head, path))
    return runner


def _example_inputs(cache: list[LayerCache], x: Tensor, max_len: int) -> tuple:
    """Inputs of a `DecoderStep` call shaped like ``x`` over copies of ``cache``."""
    rows = x.shape[0]
    padding = padding_bias(None, rows, max_len, cache[0].attn.kv)
    kv, history = ([t.clone() for t in tensors] for tensors in cache_tensors(cache))  # the call writes them
    position = torch.tensor([max_len - 1], device=x.device)
    return torch.zeros_like(x, memory_format=torch.contiguous_format), position, padding, kv, history


def _export_and_compile(
    model: DALLE, cache: list[LayerCache], x: Tensor, max_len: int, head: str, path: Path
) -> None:
    """Export `DecoderStep` for calls shaped like ``x`` and compile it into the package ``path``."""
    started = time.perf_counter()
    logger.info("compiling the generation step (tens of seconds, once per model and batch shape)")
    step = DecoderStep(model, max_len, head)
    with torch.no_grad():
        exported = torch.export.export(step, _example_inputs(cache, x, max_len))
        # inductor's C++ GEMM kernels (x86 vector units), or ATen's products elsewhere
        gemm = "CPP" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "ATEN"
        options = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": gemm}
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs=options)
    logger.info("compiled the generation step in %.1f s", time.perf_counter() - started)


def _cuda_graph_runner(step: DecoderStep, x: Tensor, cache: list[LayerCache]) -> Runner:
    """``step`` captured as a CUDA graph for calls shaped like ``x`` over ``cache``'s tensors
    (one launch a step instead of one per operator). Never run on a GPU yet: see the README."""
    max_len = cache[0].attn.kv.shape[3]
    static_x, static_position, static_padding, *copies = _example_inputs(cache, x, max_len)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():  # a warm-up outside the graph (on copies of the cache)
        step(static_x, static_position, static_padding, *copies)
    torch.cuda.current_stream().wait_stream(stream)
    kv, history = cache_tensors(cache)  # the graph reads and writes the call's own cache
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_logits = step(static_x, static_position, static_padding, kv, history)

    def run(x: Tensor, position: Tensor, padding: Tensor, kv: list[Tensor], history: list[Tensor]):
        static_x.copy_(x)
        static_position.copy_(position)
        static_padding.copy_(padding)
        graph.replay()
        return static_logits.clone()

    return run
