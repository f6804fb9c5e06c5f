"""What the torch-only backends (``ddp``, ``fsdp``) share: one process per device, started by
``torchrun``, talking over torch.distributed.

Processes talk over gloo on CPU and NCCL on CUDA (``cpu:gloo,cuda:nccl`` when a GPU is there);
the per-step agreement to stop goes over gloo, so the loop waits for the GPU only when it logs
or saves. Collectives time out after ``timeout_s`` seconds, so a process that died without its
launcher noticing still ends the run instead of hanging it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dalle_core.backends import local_device
from dalle_core.interfaces import DistributedBackend

#: what torchrun (and torch.distributed's env:// rendezvous) sets for every process
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class ProcessGroupBackend(DistributedBackend):
    """torch.distributed's default process group; the launcher's environment says who is who
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Subclasses
    say how the model is wrapped."""

    def __init__(self, timeout_s: float = 600.0) -> None:
        self.timeout = timedelta(seconds=timeout_s)
        self._device = torch.device("cpu")

    def initialize(self) -> None:
        missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"the {self.plugin_name} backend runs under a launcher that sets {', '.join(missing)}: "
                f"start it with torchrun --nproc_per_node N $(which dalle-train) COMMAND ... "
                f"--distributed-backend {self.plugin_name}"
            )
        if not dist.is_initialized():
            # imported before the group exists: its functions' default ``group=group.WORLD`` is
            # read at import, and would otherwise hold the default group, and gloo's threads,
            # until the interpreter's teardown (torch._dynamo imports it, FSDP imports dynamo)
            import torch.distributed.nn.functional  # noqa: F401
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=self.timeout)

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def local_rank(self) -> int:
        return int(os.environ["LOCAL_RANK"])

    def device(self, requested: torch.device) -> torch.device:
        """``cuda:<local_rank>`` when a CUDA device is asked for, else ``requested``."""
        self._device = local_device(requested, self.local_rank)
        return self._device

    def barrier(self) -> None:
        dist.barrier()

    def average(self, tensor: Tensor) -> Tensor:
        # a sum, then a division: gloo's AVG has been reported to sum (pytorch issue 162338)
        total = tensor.detach().to(self._device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return (total / self.world_size).to(tensor.device)

    def any(self, flag: bool) -> bool:
        """Reduced on the CPU (gloo): agreeing to stop, every step, never waits for a GPU."""
        count = torch.tensor(float(flag), device="cpu")
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        return bool(count.item() > 0)

    def gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
