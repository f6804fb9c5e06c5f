"""Where a benchmark's time goes: torch.profiler self time per operator and per source line.

    PYTHONPATH=packages/dalle-core/src python benchmarks/profile_core.py A-codes
    PYTHONPATH=packages/dalle-core/src python benchmarks/profile_core.py generation --threads 1

Each operator's self time is charged to the nearest enclosing frame in dalle_core (forward),
to the autograd node that ran it (backward, ``bwd <Node>``), or to the optimizer. Profile on an
idle machine: with the 2 cores shared, every parallel operator waits on the scheduler and small
operators look far more expensive than they are (``--threads 1`` is less sensitive to that).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402
import torch  # noqa: E402
from quiet import Quiet  # noqa: E402
from torch.profiler import profile  # noqa: E402


def location(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        name = parent.name
        if "dalle_core/" in name or "torch/optim" in name or "benchmarks/" in name:
            return name.split("src/")[-1]
        if name.startswith("autograd::engine::evaluate_function: "):
            return "bwd " + name.split(": ", 1)[1]
        parent = parent.cpu_parent
    return "(other)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=[*bench_core.CASES, "generation"])
    parser.add_argument("--threads", type=int, default=bench_core.THREADS)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (calls for generation)")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--wait-budget", type=float, default=600.0,
                        help="seconds to wait in all for other processes to leave the CPUs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.case == "generation":
        model = bench_core.build("A").eval()
        text = torch.randint(1, model.num_text_tokens, (bench_core.GEN_IMAGES, model.text_seq_len))

        def step() -> None:
            model.generate_images(text, filter_thres=bench_core.FILTER_THRES,
                                  generator=torch.Generator().manual_seed(0))
    else:
        config, pixels = bench_core.CASES[args.case]
        model = bench_core.build(config)
        text, image = bench_core.make_batch(model, bench_core.BATCH, pixels)
        model.train()
        step = bench_core.make_step(lambda: model(text, image, return_loss=True), model, fused=True)

    for _ in range(2):
        step()
    quiet = Quiet(wait_budget_s=args.wait_budget)
    quiet.wait_idle()
    times = [quiet.time(step) for _ in range(5)]
    print(f"{args.case}, {args.threads} thread(s): median {statistics.median(times):.3f} s per step "
          f"(best {min(times):.3f})")
    while True:  # profile again while other processes took the CPUs, within the waiting budget
        quiet.wait_idle()
        before = quiet.snapshot()
        with profile(record_shapes=True, with_stack=True) as prof:
            for _ in range(args.steps):
                step()
        if not quiet.contended(before, quiet.snapshot()) or quiet.waited_s >= quiet.wait_budget_s:
            break
    print(f"contention: {quiet.summary()}")

    by_op: dict = collections.defaultdict(lambda: [0.0, 0])
    by_line: dict = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        where = location(event)
        shapes = str(event.input_shapes)[:48]
        for table, key in ((by_op, (event.name, shapes, where)), (by_line, where)):
            table[key][0] += event.self_cpu_time_total / 1000 / args.steps
            table[key][1] += 1 / args.steps
    total = sum(v[0] for v in by_line.values())
    calls = sum(v[1] for v in by_line.values())
    print(f"\naten self time {total:.1f} ms per step, {calls:.0f} aten calls per step\n")
    print("by source line / backward node:")
    for where, (ms, n) in sorted(by_line.items(), key=lambda kv: -kv[1][0])[: args.rows]:
        print(f"  {ms:8.2f} ms {ms / total:6.1%} {n:7.0f} calls  {where}")
    print("\nby operator, input shapes and place:")
    for (name, shapes, where), (ms, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[: args.rows]:
        print(f"  {ms:8.2f} ms {n:6.0f}x {name[:36]:36s} {shapes:48s} {where}")


if __name__ == "__main__":
    main()
