"""``ddp``: torch DistributedDataParallel, one process per device, launched by ``torchrun``.

DDP broadcasts rank 0's weights when it wraps the model and averages gradients in the backward
of an accumulation's last micro-batch (the others run under ``no_sync``); every process holds
every weight and the optimizer's whole state, so saving needs nothing beyond the defaults.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from dalle_core.interfaces import StepPlan
from dalle_train.backends.process_group import ProcessGroupBackend


class DDPBackend(ProcessGroupBackend):
    """torch.distributed with DistributedDataParallel."""

    plugin_name = "ddp"

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, plan: StepPlan
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        device_ids = [self._device.index] if self._device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids), optimizer

    def accumulating(self, model: nn.Module, sync: bool) -> AbstractContextManager[Any]:
        """``model.no_sync()`` for all but the last micro-batch of an optimizer step."""
        return contextlib.nullcontext() if sync else model.no_sync()
