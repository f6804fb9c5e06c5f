"""Run by ``horovodrun -np 2`` (test_backend_two_processes.py): `HorovodBackend` itself in two
processes, against the same computation in one, with plain SGD, whose step is proportional to
the gradient (AdamW, the trainer's optimizer, hides a gradient summed instead of averaged).
Each check prints ``ok NAME``; a failed one raises (a non-zero exit)."""

from __future__ import annotations

import torch
from torch import nn

from dalle_core.interfaces import StepPlan
from dalle_dist_horovod import HorovodBackend

LR, SAMPLES, CLIP = 0.5, 4, 0.05


def model_and_optimizer(seed: int, momentum: float = 0.0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)


def data(ga_steps: int, world: int) -> torch.Tensor:
    """Inputs of one optimizer step: [micro-batch, rank, sample, feature]."""
    return torch.randn(ga_steps, world, SAMPLES, 4, generator=torch.Generator().manual_seed(7))


def loss(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs).pow(2).mean()


def reference(ga_steps: int, world: int, clip: float | None) -> list[torch.Tensor]:
    """One process, every rank's samples in each micro-batch: the weights after one step."""
    model, optimizer = model_and_optimizer(seed=0)
    for micro in data(ga_steps, world):
        (loss(model, micro.reshape(-1, 4)) / ga_steps).backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
    optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def distributed_step(backend: HorovodBackend, ga_steps: int, clip: float | None) -> list[torch.Tensor]:
    """Each rank starts from its own weights (rank 0's are broadcast), runs its share."""
    model, optimizer = model_and_optimizer(seed=backend.rank)
    model, optimizer = backend.wrap(model, optimizer, StepPlan(micro_batch_size=SAMPLES, ga_steps=ga_steps,
                                                               clip_grad_norm=clip))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for index, micro in enumerate(data(ga_steps, backend.world_size)):
        with backend.accumulating(model, sync=index == ga_steps - 1):
            backend.backward(loss(model, micro[backend.rank]) / ga_steps, scaler)
    backend.step(optimizer, scaler, clip)
    assert all(p.grad is None for p in model.parameters()), "step leaves the gradients zeroed"
    return [p.detach().clone() for p in model.parameters()]


def same_everywhere(backend: HorovodBackend, tensors: list[torch.Tensor]) -> None:
    gathered = backend.gather_object([t.tolist() for t in tensors])
    assert all(g == gathered[0] for g in gathered), f"process {backend.rank}: the processes differ"


def close(mine: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def main() -> None:
    backend = HorovodBackend()
    backend.initialize()
    assert backend.world_size == 2 and backend.rank in (0, 1) and backend.local_rank == backend.rank
    assert backend.is_root == (backend.rank == 0)
    print("ok world", flush=True)

    # averages: a copy, the mean of every process's value; any; gather_object
    value = torch.tensor([float(backend.rank), 2.0 * backend.rank])
    averaged = backend.average(value)
    torch.testing.assert_close(averaged, torch.tensor([0.5, 1.0]))
    averaged.add_(1)
    assert value.tolist() == [float(backend.rank), 2.0 * backend.rank], "average changed its input"
    assert backend.any(backend.rank == 1) is True and backend.any(False) is False
    assert backend.gather_object({"rank": backend.rank}) == [{"rank": 0}, {"rank": 1}]
    backend.barrier()
    print("ok average any gather", flush=True)

    # the model's weights and buffers are rank 0's once wrapped; a fresh optimizer is not stepped
    # (AdamW with weight decay: Horovod's way of creating a fresh state, a step on zero
    # gradients, would move the weights)
    model, _ = model_and_optimizer(seed=backend.rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    model.register_buffer("counter", torch.tensor(float(backend.rank)))
    wrapped, distributed = backend.wrap(model, optimizer, StepPlan(micro_batch_size=SAMPLES))
    zero, _ = model_and_optimizer(seed=0)
    close([p.detach() for p in wrapped.parameters()], [p.detach() for p in zero.parameters()])
    assert float(model.counter) == 0.0 and not distributed.state
    assert backend.wrap(model, None, StepPlan(micro_batch_size=SAMPLES)) == (model, None)
    print("ok broadcast", flush=True)

    # gradients averaged (not summed) over the processes, accumulated, clipped after averaging
    for ga_steps, clip in ((1, None), (2, None), (2, CLIP), (3, CLIP)):
        mine = distributed_step(backend, ga_steps, clip)
        same_everywhere(backend, mine)
        close(mine, reference(ga_steps, backend.world_size, clip))
        print(f"ok step ga_steps={ga_steps} clip={clip}", flush=True)

    # an optimizer with state (momentum) is broadcast from rank 0 when wrapped; its state_dict
    # round-trips
    model, optimizer = model_and_optimizer(seed=0, momentum=0.9)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 1.0 + backend.rank)
    optimizer.step()
    optimizer.zero_grad()
    model, distributed = backend.wrap(model, optimizer, StepPlan(micro_batch_size=SAMPLES))
    buffers = [distributed.state[p]["momentum_buffer"] for p in model.parameters()]
    close(buffers, [torch.ones_like(b) for b in buffers])
    state = backend.optimizer_state_dict(distributed)
    distributed.param_groups[0]["lr"] = 0.25
    backend.load_optimizer_state_dict(distributed, state)
    assert distributed.param_groups[0]["lr"] == LR  # loaded
    print("ok optimizer state", flush=True)

    backend.shutdown()
    print("ok shutdown", flush=True)


if __name__ == "__main__":
    main()
