"""``fsdp``: torch FSDP2 (``fully_shard``), one process per device, launched by ``torchrun``.

The model is one FSDP group: each process keeps a shard of every trained weight, of its
gradient and of the optimizer's state; the whole weights are gathered for each forward and
backward, and gradients are reduce-scattered at an accumulation's last micro-batch. Frozen
weights (a DALLE's VAE) are left out of the sharding: every process keeps them whole.

Correctness on gloo: gradients are reduced as sums and divided by the number of processes here
(gloo's AVG has been reported to sum, pytorch issue 162338). Saving gathers the whole weights
for the root, and the optimizer's state in torch's ordinary form, so an fsdp checkpoint is an
ordinary checkpoint that ddp, one process or generation reads, and fsdp resumes from theirs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dalle_core.interfaces import StepPlan
from dalle_train.backends.process_group import ProcessGroupBackend


class FSDPBackend(ProcessGroupBackend):
    """torch.distributed with FSDP2 over a one-dimensional device mesh of every process."""

    plugin_name = "fsdp"
    replicated = False

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, plan: StepPlan
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Broadcast rank 0's weights (each process initialised its own), then shard the trained
        ones in place; the optimizer, built on the whole parameters, is pointed at the shards."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
        names = {id(parameter): name for name, parameter in model.named_parameters()}  # before sharding
        frozen = {parameter for parameter in model.parameters() if not parameter.requires_grad}
        mesh = init_device_mesh(self._device.type, (self.world_size,))
        self._model_class = type(model)  # fully_shard gives the model a subclass of its own
        fully_shard(model, mesh=mesh, ignored_params=frozen or None)
        model.set_force_sum_reduction_for_comms(True)
        model.set_gradient_divide_factor(float(self.world_size))
        if optimizer is not None:
            sharded = dict(model.named_parameters())
            for group in optimizer.param_groups:
                group["params"] = [sharded[names[id(parameter)]] for parameter in group["params"]]
        return model, optimizer

    def accumulating(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradients stay whole and local until an accumulation's last micro-batch."""
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[None]:
        """Every process swaps each sharded weight for its whole value (a collective
        all-gather), and the model's class for the one it had before sharding, so that the root
        saves an ordinary model; the shards and the class are put back after."""
        from torch.distributed.tensor import DTensor

        sharded_class, model.__class__ = type(model), self._model_class
        swapped = []
        for module in model.modules():
            for name, parameter in list(module._parameters.items()):
                if isinstance(parameter, DTensor):
                    whole = nn.Parameter(parameter.full_tensor().detach(), requires_grad=False)
                    swapped.append((module, name, parameter))
                    module._parameters[name] = whole
        try:
            yield
        finally:
            for module, name, parameter in swapped:
                module._parameters[name] = parameter
            model.__class__ = sharded_class

    def shutdown(self) -> None:
        """Also empties DTensor's caches (`release_dtensor_caches`), so that the process group
        is freed with the model, before the interpreter's teardown."""
        release_dtensor_caches()
        super().shutdown()

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Each state tensor gathered whole (collective), numbered as ``torch.optim`` numbers
        the parameters of its groups."""
        from torch.distributed.tensor import DTensor

        state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: not changed
        state["state"] = {
            index: {key: value.full_tensor() if isinstance(value, DTensor) else value
                    for key, value in values.items()}
            for index, values in state["state"].items()
        }
        return state

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """The whole state (as any backend saved it) cut to this process's shards."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        optimizer.load_state_dict(state)
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        for parameter in parameters:
            if not isinstance(parameter, DTensor):
                continue
            values = optimizer.state.get(parameter, {})
            for key, value in values.items():
                whole = torch.is_tensor(value) and not isinstance(value, DTensor)
                if whole and value.shape == parameter.shape:
                    # every process holds the whole value: each keeps its own shard, no communication
                    values[key] = distribute_tensor(value, parameter.device_mesh, parameter.placements,
                                                    src_data_rank=None)


def release_dtensor_caches() -> None:
    """Empty the caches DTensor keeps across calls: sharding decisions (Python and C++),
    redistribution plans, mesh topology. Their entries hold the device mesh, and through it the
    process group with gloo's threads, for the life of the process; joining those threads at the
    interpreter's teardown is a crash that pytorch PR 179291 describes (SIGABRT)."""
    import sys

    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache

    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    torch._C._clear_DTensor_sharding_propagator_cache()
    clear_redistribute_planner_cache()
    for name, module in list(sys.modules.items()):  # the functools caches of DTensor's modules
        if not name.startswith("torch.distributed.tensor") or module is None:
            continue
        for value in list(vars(module).values()):
            members = list(vars(value).values()) if isinstance(value, type) else []
            for member in (value, *members):
                cached = getattr(member, "__func__", member)  # a static method's function
                if not isinstance(cached, type) and callable(getattr(cached, "cache_clear", None)):
                    cached.cache_clear()
