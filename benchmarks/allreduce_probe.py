"""One process of the allreduce probe of `bench_scaling.py`: the milliseconds of a blocking
average over all processes of ``--elements`` float32 values, through torch.distributed's gloo
(started by ``torchrun``) or Horovod's gloo (started by ``horovodrun``), 1 torch thread. Rank 0
prints one JSON line: ``{"library": ..., "elements": ..., "ms": [one figure per repeat]}``.

    torchrun --standalone --nproc_per_node 2 benchmarks/allreduce_probe.py torch
    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/allreduce_probe.py horovod
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch


def torch_gloo(values: torch.Tensor) -> tuple[int, Callable[[], None]]:
    """(rank, one average) with torch.distributed's gloo process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo")

    def average() -> None:
        total = values.clone()
        dist.all_reduce(total)
        total /= dist.get_world_size()

    return dist.get_rank(), average


def horovod_gloo(values: torch.Tensor) -> tuple[int, Callable[[], None]]:
    """(rank, one average) with Horovod's allreduce (gloo when started by ``horovodrun --gloo``)."""
    import horovod.torch as hvd

    hvd.init()
    return hvd.rank(), lambda: hvd.allreduce(values, op=hvd.Average)


LIBRARIES = {"torch": torch_gloo, "horovod": horovod_gloo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", choices=sorted(LIBRARIES))
    parser.add_argument("--elements", type=int, default=4_639_555,
                        help="floats averaged (default: config A's trained weights)")
    parser.add_argument("--calls", type=int, default=20, help="allreduces timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    torch.set_num_threads(1)
    values = torch.randn(options.elements)
    rank, average = LIBRARIES[options.library](values)
    for _ in range(3):  # warm-up: connections, Horovod's response cache
        average()
    figures = []
    for _ in range(options.repeats):
        start = time.perf_counter()
        for _ in range(options.calls):
            average()
        figures.append((time.perf_counter() - start) / options.calls * 1000)
    if rank == 0:
        print(json.dumps({"library": options.library, "elements": options.elements, "ms": figures}),
              flush=True)


if __name__ == "__main__":
    main()
