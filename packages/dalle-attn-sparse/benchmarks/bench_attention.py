"""Benchmark: the ``triton`` block-sparse kernel against dense causal flash SDPA and FlexAttention.

For each attention pattern at DALL-E sizes (bf16, 16 heads, head dim 64, 256 text tokens + bos
and a 32 x 32 or 64 x 64 image grid: 1280 and 4352 positions), times forward and
forward + backward of

- ``triton``: `dalle_attn_sparse.TritonSparseKernel` with the pattern's layout;
- ``flash``: ``scaled_dot_product_attention(is_causal=True)`` on the flash backend, which computes
  the dense causal attention (the work the ``full`` pattern needs, whatever the pattern);
- ``flex``: dalle-core's `FlexKernel` (compiled FlexAttention with the pattern's block mask),

all in one run, and prints the ratios ``flash / triton`` and ``flex / triton`` (above 1: triton
is faster). Before timing, the triton output is compared with FlexAttention's.

Needs a CUDA GPU with triton installed (``pip install 'dalle-attn-sparse[triton]'``)::

    python packages/dalle-attn-sparse/benchmarks/bench_attention.py
    python packages/dalle-attn-sparse/benchmarks/bench_attention.py --seq 4352 --block-m 128

Targets (issue 5): at 4352, ``axial_row``, ``axial_col`` and ``conv_like`` forward + backward at
least 3x faster than flash and no slower than FlexAttention; the last lines say whether they hold.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dalle_core.attention.kernels import FlexKernel
from dalle_core.attention.patterns import PATTERNS, AttentionPattern

DEVICE = "cuda"
TEXT_LEN = 257  # 256 text tokens and the bos
GRIDS = {1280: 32, 4352: 64}  # sequence length -> image grid side (TEXT_LEN + side**2 - 1)
TARGET_SEQ, TARGET_PATTERNS, TARGET_SPEEDUP = 4352, ("axial_row", "axial_col", "conv_like"), 3.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", choices=sorted(GRIDS), default=sorted(GRIDS),
                        help="sequence lengths to run (default: both)")
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--block-m", type=int, default=64, help="query tile of the triton kernel")
    parser.add_argument("--block-n", type=int, default=64, help="key tile of the triton kernel")
    parser.add_argument("--num-warps", type=int, default=None, help="default: 4 up to head dim 64, else 8")
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (no torch.compile)")
    return parser.parse_args()


def require_gpu() -> None:
    """Exit with a clear message where the compiled kernels cannot run."""
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "the kernels' correctness is tested on CPU by the package's tests instead")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the benchmark times the compiled kernels, not the interpreter")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("triton is not installed: pip install 'dalle-attn-sparse[triton]'")


def time_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median time of ``fn`` in milliseconds (``triton.testing.do_bench``, L2 flushed)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def flash_causal(q, k, v, pattern):
    """Dense causal attention on the flash backend (the pattern is ignored: the full work)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_pattern(kind: str, seq: int, args, methods: dict) -> dict[str, tuple[float, float]]:
    """{method: (forward ms, forward + backward ms)} for one pattern and length."""
    pattern = AttentionPattern(kind, text_len=TEXT_LEN, fmap_size=GRIDS[seq])
    assert pattern.seq_len == seq
    shape = (args.batch, args.heads, seq, args.dim_head)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, generator=generator)
               .requires_grad_() for _ in range(3))
    grad = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, generator=generator)
    if "flex" in methods:
        with torch.no_grad():
            diff = (methods["triton"](q, k, v, pattern) - methods["flex"](q, k, v, pattern)).abs().max()
        print(f"  {kind:>9} {seq}: max |triton - flex| = {diff.item():.2e}", flush=True)
    times = {}
    for name, attend in methods.items():
        def forward(attend=attend):
            with torch.no_grad():
                attend(q, k, v, pattern)

        def forward_backward(attend=attend):
            attend(q, k, v, pattern).backward(grad)

        times[name] = (time_ms(forward), time_ms(forward_backward, grad_to_none=[q, k, v]))
    return times


def main() -> None:
    args = parse_args()
    require_gpu()
    import triton

    from dalle_attn_sparse import TritonSparseKernel

    methods = {
        "triton": TritonSparseKernel(args.block_m, args.block_n, num_warps=args.num_warps,
                                     num_stages=args.num_stages),
        "flash": flash_causal,
    }
    if not args.no_flex:
        methods["flex"] = FlexKernel()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}")
    print(f"bf16, batch {args.batch}, heads {args.heads}, dim_head {args.dim_head}, triton tiles "
          f"{args.block_m}x{args.block_n}; command: {' '.join(sys.argv)}")
    results = {}
    for seq in args.seq:
        for kind in args.patterns:
            results[kind, seq] = bench_pattern(kind, seq, args, methods)

    names = list(methods)
    header = "".join(f"{name + ' ' + part:>16}" for part in ("fwd", "fwd+bwd") for name in names)
    ratios = "".join(f"{other + '/triton ' + part:>22}" for part in ("fwd", "fwd+bwd")
                     for other in names[1:])
    print(f"\n{'pattern':>9} {'seq':>5}{header}{ratios}   (times in ms; ratio > 1: triton faster)")
    for (kind, seq), times in results.items():
        cells = "".join(f"{times[name][part]:>16.3f}" for part in (0, 1) for name in names)
        cells += "".join(f"{times[other][part] / times['triton'][part]:>22.2f}"
                         for part in (0, 1) for other in names[1:])
        print(f"{kind:>9} {seq:>5}{cells}")

    checked = [(kind, TARGET_SEQ) for kind in TARGET_PATTERNS if (kind, TARGET_SEQ) in results]
    for kind, seq in checked:
        times = results[kind, seq]
        speedup = times["flash"][1] / times["triton"][1]
        line = f"target {kind} at {seq}: fwd+bwd {speedup:.2f}x flash (needs >= {TARGET_SPEEDUP:g}x)"
        met = speedup >= TARGET_SPEEDUP
        if "flex" in times:
            versus_flex = times["flex"][1] / times["triton"][1]
            line += f", {versus_flex:.2f}x flex (needs >= 1)"
            met = met and versus_flex >= 1.0
        print(f"{line}: {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
