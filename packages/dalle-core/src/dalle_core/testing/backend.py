"""The conformance suite every distributed backend must pass, run as a single process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dalle_core.interfaces import DistributedBackend, StepPlan


class BackendConformance:
    """A `DistributedBackend` in a world of one process: subclass it and define
    `make_backend`::

        class TestMyBackend(BackendConformance):
            def make_backend(self):
                return MyBackend()

    The ``backend`` fixture initialises it; override the fixture to set the launcher's
    environment first (``MASTER_ADDR`` ...) or to leave the process group afterwards.
    """

    def make_backend(self) -> DistributedBackend:
        """The backend under test, not yet initialised."""
        raise NotImplementedError(f"{type(self).__name__} must define make_backend()")

    @pytest.fixture
    def backend(self) -> DistributedBackend:
        backend = self.make_backend()
        backend.initialize()
        return backend

    def plan(self, ga_steps: int = 1, clip_grad_norm: float | None = None) -> StepPlan:
        """How the suite steps: micro-batches of 8 samples."""
        return StepPlan(micro_batch_size=8, ga_steps=ga_steps, clip_grad_norm=clip_grad_norm)

    @staticmethod
    def whole_parameters(backend: DistributedBackend, model: nn.Module) -> list[torch.Tensor]:
        """The unwrapped ``model``'s parameters, whole (gathered where the backend shards them)."""
        with backend.gathered(model):
            return [parameter.detach().cpu().clone() for parameter in model.parameters()]

    def model_and_optimizer(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def test_world_of_one(self, backend: DistributedBackend) -> None:
        assert isinstance(backend, DistributedBackend)
        assert backend.plugin_name, "plugin_name is the name the backend is registered under"
        assert (backend.world_size, backend.rank, backend.local_rank) == (1, 0, 0)
        assert backend.is_root is True

    def test_barrier(self, backend: DistributedBackend) -> None:
        backend.barrier()

    def test_wrap_and_step(self, backend: DistributedBackend) -> None:
        model, optimizer = self.model_and_optimizer()
        before = [p.detach().clone() for p in model.parameters()]
        unwrapped = model
        model, optimizer = backend.wrap(model, optimizer, self.plan())
        device = next(model.parameters()).device
        inputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).to(device)
        model(inputs).pow(2).mean().backward()
        optimizer.step()
        after = self.whole_parameters(backend, unwrapped)
        assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))

    def test_wrap_without_optimizer(self, backend: DistributedBackend) -> None:
        model, _ = self.model_and_optimizer()
        wrapped, optimizer = backend.wrap(model, None, self.plan())
        assert optimizer is None
        device = next(wrapped.parameters()).device
        assert wrapped(torch.zeros(1, 4, device=device)).shape == (1, 2)

    def test_average_is_identity_and_copies(self, backend: DistributedBackend) -> None:
        for value in (torch.tensor(2.5), torch.tensor([1.0, -2.0, 3.0])):
            original = value.clone()
            averaged = backend.average(value)
            torch.testing.assert_close(averaged.cpu(), original)
            averaged.add_(1)
            assert torch.equal(value, original), "average changed its input"

    def test_accumulate_backward_and_step(self, backend: DistributedBackend) -> None:
        """Two micro-batches accumulated (the first without a reduction), one clipped step:
        the parameters move as one SGD step on the summed gradient, clipped, and the
        gradients are zeroed."""
        model, optimizer = self.model_and_optimizer()
        reference, _ = self.model_and_optimizer()
        unwrapped = model
        model, optimizer = backend.wrap(model, optimizer, self.plan(ga_steps=2, clip_grad_norm=0.01))
        device = next(model.parameters()).device
        inputs = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        for index, micro in enumerate(inputs):
            with backend.accumulating(model, sync=index == len(inputs) - 1):
                backend.backward(model(micro.to(device)).pow(2).mean() / 2, scaler)
        backend.step(optimizer, scaler, clip_grad_norm=0.01)
        sum(reference(micro).pow(2).mean() / 2 for micro in inputs).backward()
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.01)
        assert all(mine.grad is None for mine in model.parameters()), "step leaves the gradients zeroed"
        stepped = self.whole_parameters(backend, unwrapped)
        for mine, theirs in zip(stepped, reference.parameters(), strict=True):
            torch.testing.assert_close(mine, (theirs - 0.1 * theirs.grad).detach())

    def test_device_any_and_gather(self, backend: DistributedBackend) -> None:
        assert backend.device(torch.device("cpu")).type in ("cpu", "cuda")
        assert backend.any(True) is True and backend.any(False) is False
        assert backend.gather_object({"rank": backend.rank}) == [{"rank": 0}]
        backend.shutdown()

    def test_state_round_trip(self, backend: DistributedBackend, tmp_path: Path) -> None:
        """Within `gathered` the model's state is whole; the optimizer's state in torch's form
        loads back; the engine's own state, if it writes one, restores the same weights."""
        model, optimizer = self.model_and_optimizer()
        unwrapped = model
        model, optimizer = backend.wrap(model, optimizer, self.plan())
        device = next(model.parameters()).device
        model(torch.ones(2, 4, device=device)).sum().backward()
        optimizer.step()
        with backend.gathered(unwrapped):
            weights = {key: tensor.detach().cpu().clone() for key, tensor in unwrapped.state_dict().items()}
        assert weights.keys() == {"weight", "bias"} and weights["weight"].shape == (2, 4)
        state = backend.optimizer_state_dict(optimizer)
        if state is not None:
            assert [group["lr"] for group in state["param_groups"]] == [0.1]
            backend.load_optimizer_state_dict(optimizer, state)
        wrote = backend.save_engine_state(tmp_path / "engine")
        assert isinstance(wrote, bool)
        assert backend.load_engine_state(tmp_path / "missing") is False
        if wrote:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.zero_()
            assert backend.load_engine_state(tmp_path / "engine") is True
            with backend.gathered(unwrapped):
                for key, tensor in unwrapped.state_dict().items():
                    torch.testing.assert_close(tensor.detach().cpu(), weights[key], msg=key)
