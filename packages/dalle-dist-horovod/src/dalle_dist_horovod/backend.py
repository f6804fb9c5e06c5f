"""``horovod``: data-parallel training with Horovod, one process per device, launched by
``horovodrun``.

Horovod is imported when the backend initializes, never at import time. Rank 0's weights (and
its optimizer's state, when it has one) are broadcast when the model is wrapped; the optimizer
becomes a ``hvd.DistributedOptimizer`` that averages each gradient across processes as soon as
the last micro-batch of an accumulation has computed it (``backward_passes_per_step`` is the
trainer's ``--ga-steps``), overlapping the reductions with the rest of the backward pass.
`HorovodBackend.step` waits for them (``synchronize``) before the gradients are unscaled and
clipped, then steps without reducing again.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from dalle_core.backends import local_device
from dalle_core.interfaces import DistributedBackend, StepPlan

LAUNCH_HINT = (
    "horovodrun -np N -H localhost:N --gloo dalle-train COMMAND ... --distributed-backend horovod"
)
#: what horovodrun (gloo) and mpirun (Open MPI, MPICH, Slurm's PMI) set for every process
LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def _horovod() -> Any:
    """``horovod.torch``, with a message saying how to get it when it is not installed."""
    try:
        import horovod.torch as hvd
    except ImportError as error:  # a RuntimeError: the trainer reports it as a usage error
        raise RuntimeError(
            f"the horovod backend needs Horovod built with torch support ({error}): run "
            "'dalle-build-horovod --install' (see the dalle-dist-horovod README)"
        ) from error
    return hvd


class HorovodBackend(DistributedBackend):
    """Horovod's allreduce over gloo (or MPI, NCCL where Horovod was built with them); the
    launcher (``horovodrun``) says who is who."""

    plugin_name = "horovod"

    def __init__(self) -> None:
        self._hvd: Any = None
        self._device = torch.device("cpu")

    @property
    def hvd(self) -> Any:
        """The ``horovod.torch`` module, once `initialize` has run."""
        if self._hvd is None:
            raise RuntimeError("the horovod backend is not initialized: call initialize() first")
        return self._hvd

    def initialize(self) -> None:
        """``hvd.init()``; an error naming ``horovodrun`` when no launcher started this process."""
        if not any(name in os.environ for name in LAUNCHER_VARIABLES):
            raise RuntimeError(
                f"the horovod backend runs under horovodrun (no {' or '.join(LAUNCHER_VARIABLES)} in "
                f"the environment): start it with {LAUNCH_HINT}"
            )
        hvd = _horovod()
        hvd.init()
        self._hvd = hvd

    @property
    def world_size(self) -> int:
        return int(self.hvd.size())

    @property
    def rank(self) -> int:
        return int(self.hvd.rank())

    @property
    def local_rank(self) -> int:
        return int(self.hvd.local_rank())

    def device(self, requested: torch.device) -> torch.device:
        """``cuda:<local_rank>`` when a CUDA device is asked for, else ``requested``."""
        self._device = local_device(requested, self.local_rank)
        return self._device

    def barrier(self) -> None:
        self.hvd.barrier()

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, plan: StepPlan
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Broadcast rank 0's weights and buffers (and its optimizer's state when it has any)
        and return ``(model, hvd.DistributedOptimizer)``: the model is not wrapped, the
        optimizer averages gradients once per ``plan.ga_steps`` backward passes.

        A fresh optimizer's state is not broadcast: every process made the same one, and
        Horovod would create its state with a step on zero gradients (which moves the weights
        under weight decay)."""
        hvd = self.hvd
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        if optimizer is None:
            return model, None
        state = optimizer.state_dict() if optimizer.state else None
        distributed = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            backward_passes_per_step=plan.ga_steps,
            op=hvd.Average,
        )
        if hvd.broadcast_object(state is not None, root_rank=0, name="dalle.optimizer_has_state"):
            if state is None:
                raise RuntimeError("the optimizer has state on process 0 but not on process "
                                   f"{self.rank}: every process must wrap the same optimizer")
            # DistributedOptimizer is a new optimizer over the same parameter groups: no state
            self.load_optimizer_state_dict(distributed, state)
            hvd.broadcast_optimizer_state(distributed, root_rank=0)
        return model, distributed

    def step(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip_grad_norm: float | None
    ) -> None:
        """Wait for the gradients' averages (``synchronize``), unscale and clip them, step
        without reducing them again, update the scaler, zero the gradients."""
        synchronize = getattr(optimizer, "synchronize", None)
        if synchronize is None:  # not wrapped (an optimizer of no process group)
            super().step(optimizer, scaler, clip_grad_norm)
            return
        synchronize()
        if clip_grad_norm:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()  # Horovod's takes no argument; torch's default sets them to None

    def average(self, tensor: Tensor) -> Tensor:
        """Allreduce average of a copy of ``tensor``."""
        return self.hvd.allreduce(tensor.detach().clone(), op=self.hvd.Average)

    def any(self, flag: bool) -> bool:
        """A sum over every process of a CPU float."""
        count = self.hvd.allreduce(torch.tensor(float(flag)), op=self.hvd.Sum)
        return bool(count.item() > 0)

    def gather_object(self, obj: Any) -> list[Any]:
        return list(self.hvd.allgather_object(obj))

    def shutdown(self) -> None:
        if self._hvd is not None:
            self._hvd.shutdown()
            self._hvd = None
