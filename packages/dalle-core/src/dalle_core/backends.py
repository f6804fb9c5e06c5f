"""`SingleProcessBackend`: the ``none`` distributed backend, for training in one process."""

from __future__ import annotations

import torch
from torch import Tensor

from dalle_core.interfaces import DistributedBackend, StepPlan


class SingleProcessBackend(DistributedBackend):
    """World size 1: nothing to join, nothing to wrap, averages are copies."""

    plugin_name = "none"

    def initialize(self) -> None:
        """Nothing to join."""

    @property
    def world_size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0

    @property
    def local_rank(self) -> int:
        return 0

    def barrier(self) -> None:
        """Nothing to wait for."""

    def wrap(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, plan: StepPlan
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
        return model, optimizer

    def average(self, tensor: Tensor) -> Tensor:
        return tensor.detach().clone()


def local_device(requested: torch.device, local_rank: int) -> torch.device:
    """The device of a process among several on one machine: ``cuda:<local_rank>`` (made the
    current CUDA device) when a CUDA device is asked for, else ``requested``. For backends that
    run one process per GPU (`DistributedBackend.device`)."""
    if requested.type != "cuda":
        return requested
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device
