"""Compile the kernels ahead of time for a GPU architecture, on any machine (no GPU needed).

Triton lowers a kernel to PTX and assembles it into a cubin with the ``ptxas`` its wheel ships,
without a device. `launched_variants` runs the package's own launchers (the forward and both
backward kernels of `ops.sparse_attention`, and `ops.sparse_decode`) on small CPU tensors with
the kernels swapped for recorders, so the variants compiled here are exactly those a launch on a
GPU builds: argument dtypes, constexprs, warps and stages. `compile_variant` compiles one for a
target and reports its shared memory against the architecture's per-block limit.

    TRITON_INTERPRET=0 python -m dalle_attn_sparse.compile_check            # sm_90 (H100), all
    TRITON_INTERPRET=0 python -m dalle_attn_sparse.compile_check --quick    # one of each kernel

Needs the compiled mode (``TRITON_INTERPRET`` unset or 0 when triton is imported).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dalle_attn_sparse import ops
from dalle_attn_sparse import triton_kernels as tk
from dalle_attn_sparse.kernel import LaunchConfig, interpreting
from dalle_core.attention.patterns import PATTERNS, AttentionPattern

KERNELS = ("attention_forward_kernel", "attention_backward_dkdv_kernel", "attention_backward_dq_kernel",
           "decode_kernel")
#: largest shared memory one block may use, bytes (opt-in maximum), per compute capability
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int8: "i8", torch.int32: "i32", torch.int64: "i64",
}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: its argument types, constexprs and launch options."""

    kernel: str
    signature: tuple[tuple[str, str], ...]  # (parameter, Triton type or "constexpr")
    constexprs: tuple[tuple[str, object], ...]
    options: tuple[tuple[str, int], ...]

    def describe(self) -> str:
        values = dict(self.constexprs)
        dtype = dict(self.signature)["Q"].lstrip("*")
        kind = {code: name for name, code in tk.KIND_CODES.items()}[values["KIND"]]
        return (f"{self.kernel} {kind} {dtype} BLOCK_D={values['BLOCK_D']} kpm={values['HAS_KPM']} "
                + " ".join(f"{k}={v}" for k, v in self.options))


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.calls.append((self.name, args, kwargs))

        return launch


@contextlib.contextmanager
def _recording() -> Iterator[list]:
    calls: list = []
    originals = {name: getattr(tk, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(tk, name, _Recorder(name, calls))
        yield calls
    finally:
        for name, kernel in originals.items():
            setattr(tk, name, kernel)


def _triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for argument {value!r}")


def _variant(name: str, args: tuple, kwargs: dict) -> Variant:
    fn = getattr(tk, name)
    constexpr_names = {fn.arg_names[i] for i in fn.constexprs}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    signature = tuple(
        (param, "constexpr" if param in constexpr_names else _triton_type(values[param]))
        for param in fn.arg_names
    )
    constexprs = tuple((param, values[param]) for param in fn.arg_names if param in constexpr_names)
    options = tuple((k, kwargs[k]) for k in LAUNCH_OPTIONS if k in kwargs)
    return Variant(name, signature, constexprs, options)


def launched_variants(
    kinds=PATTERNS, dtypes=(torch.float32, torch.float16, torch.bfloat16), head_dims=(32, 64, 128),
    padding=(False, True), config: LaunchConfig | None = None,
) -> list[Variant]:
    """The distinct kernel variants the launchers build for these patterns, dtypes, head dims and
    with or without a key padding mask (each pattern on a 64-token text and an 8 x 8 grid)."""
    config = config or LaunchConfig()
    seen: dict[Variant, None] = {}
    for kind, dtype, head_dim, padded in itertools.product(kinds, dtypes, head_dims, padding):
        pattern = AttentionPattern(kind, text_len=65, fmap_size=8)
        n = pattern.seq_len
        q, k, v = (torch.zeros(1, 2, n, head_dim, dtype=dtype) for _ in range(3))
        mask = torch.ones(1, n, dtype=torch.bool) if padded else None
        with _recording() as calls:
            layout = ops.attention_layout(pattern, n, config.block_m, config.block_n, q.device)
            positions = ops.kernel_positions(pattern, n, q.device)
            out, lse = ops.attention_forward(q, k, v, pattern, layout, positions, mask, config)
            ops.attention_backward(out, q, k, v, out, lse, pattern, layout, positions, mask, config)
            ops.sparse_decode(q[:, :, -1:], k, v, pattern, n - 1, mask, config)
        for name, args, kwargs in calls:
            seen.setdefault(_variant(name, args, kwargs), None)
    return list(seen)


def compile_variant(variant: Variant, arch: int = 90) -> dict:
    """Compile ``variant`` to a cubin for compute capability ``arch``: seconds, shared memory
    bytes, and whether that fits the architecture's per-block limit."""
    if interpreting():
        raise RuntimeError("compiling needs TRITON_INTERPRET unset or 0 when triton is imported")
    fn = getattr(tk, variant.kernel)
    source = ASTSource(fn=fn, signature=dict(variant.signature), constexprs=dict(variant.constexprs))
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(variant.options))
    shared = compiled.metadata.shared
    limit = SHARED_MEMORY_LIMIT.get(arch)
    return {
        "variant": variant.describe(), "seconds": time.perf_counter() - start, "shared_bytes": shared,
        "fits": limit is None or shared <= limit, "has_cubin": bool(compiled.asm.get("cubin")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100)")
    parser.add_argument("--quick", action="store_true",
                        help="one variant of each kernel (axial_row, bf16, head dim 64, no padding)")
    args = parser.parse_args(argv)
    if args.quick:
        variants = launched_variants(("axial_row",), (torch.bfloat16,), (64,), (False,))
    else:
        variants = launched_variants()
    print(f"compiling {len(variants)} kernel variants for sm_{args.arch}", flush=True)
    failures = 0
    for index, variant in enumerate(variants, 1):
        try:
            result = compile_variant(variant, args.arch)
        except Exception as error:  # noqa: BLE001 - report every variant, then fail
            failures += 1
            print(f"[{index}/{len(variants)}] FAILED {variant.describe()}: {error}", flush=True)
            continue
        failures += not result["fits"]
        over = "" if result["fits"] else " OVER THE LIMIT"
        print(f"[{index}/{len(variants)}] {result['variant']}: {result['seconds']:.1f} s, shared memory "
              f"{result['shared_bytes'] / 1024:.1f} KiB{over}", flush=True)
    print(f"{len(variants) - failures} of {len(variants)} variants compiled within the limits")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
