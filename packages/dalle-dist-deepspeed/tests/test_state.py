"""In a world of one process at every ZeRO stage: the optimizer's state in torch's form matches what
plain AdamW holds after the same steps and restores into a fresh engine; DeepSpeed's own files
are read back only by a run that can (stage, processes, precision, offload), and without
unpickling anything but tensors and the allowed classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import needs_deepspeed
from torch import nn

from dalle_core.interfaces import StepPlan
from dalle_dist_deepspeed import DeepSpeedBackend, engine_state

pytestmark = needs_deepspeed
STAGES = [1, 2, 3]
PLAN = StepPlan(micro_batch_size=4, ga_steps=2, clip_grad_norm=None)


def model_and_adamw() -> tuple[nn.Module, torch.optim.AdamW]:
    """Two layers with odd sizes, AdamW with decaying matrices and non-decaying vectors (as the
    trainer groups them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
        lr=0.01,
        fused=True,
    )
    return model, optimizer


def batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 5, generator=generator) for _ in range(count)]


def train_plain(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: list[torch.Tensor]) -> None:
    for first, second in zip(inputs[::2], inputs[1::2], strict=True):
        for micro in (first, second):
            (model(micro).pow(2).mean() / 2).backward()
        optimizer.step()
        optimizer.zero_grad()


def train_with(
    backend: DeepSpeedBackend, engine: nn.Module, optimizer: torch.optim.Optimizer, inputs: list[torch.Tensor]
) -> None:
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for first, second in zip(inputs[::2], inputs[1::2], strict=True):
        for index, micro in enumerate((first, second)):
            with backend.accumulating(engine, sync=index == 1):
                backend.backward(engine(micro).pow(2).mean() / 2, scaler)
        backend.step(optimizer, scaler, None)


@pytest.fixture
def started(world_of_one):
    backends: list[DeepSpeedBackend] = []

    def start(stage: int) -> DeepSpeedBackend:
        backend = DeepSpeedBackend(zero_stage=stage)
        backend.initialize()
        backends.append(backend)
        return backend

    yield start
    for backend in backends:
        backend.shutdown()


def whole_weights(backend: DeepSpeedBackend, model: nn.Module) -> dict[str, torch.Tensor]:
    with backend.gathered(model):
        return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("stage", STAGES)
def test_optimizer_state_in_torch_form_matches_plain_adamw_and_restores(stage, started):
    inputs = batches(6)
    reference, plain = model_and_adamw()
    train_plain(reference, plain, inputs[:4])
    expected = plain.state_dict()

    backend = started(stage)
    model, optimizer = model_and_adamw()
    engine, zero = backend.wrap(model, optimizer, PLAN)
    assert backend.optimizer_state_dict(zero) == {
        "state": {},
        "param_groups": backend.optimizer_state_dict(zero)["param_groups"],
    }  # before the first step: no state yet
    train_with(backend, engine, zero, inputs[:4])
    state = backend.optimizer_state_dict(zero)
    assert [g["params"] for g in state["param_groups"]] == [g["params"] for g in expected["param_groups"]]
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.1, 0.0]
    assert state["state"].keys() == expected["state"].keys()
    for index, values in expected["state"].items():
        assert state["state"][index].keys() == values.keys()
        for key, value in values.items():
            torch.testing.assert_close(state["state"][index][key], value, msg=f"{index} {key}")
    # the same state read by plain AdamW continues as the engine does
    plain.load_state_dict(state)
    train_plain(reference, plain, inputs[4:])
    train_with(backend, engine, zero, inputs[4:])
    for key, value in whole_weights(backend, model).items():
        torch.testing.assert_close(value, reference.state_dict()[key], msg=key)


@pytest.mark.parametrize("stage", STAGES)
def test_a_torch_form_state_loads_into_a_fresh_engine(stage, started):
    """What another backend saved (plain AdamW here) continues under ZeRO as it would have."""
    inputs = batches(6)
    reference, plain = model_and_adamw()
    train_plain(reference, plain, inputs[:4])
    backend = started(stage)
    model, optimizer = model_and_adamw()
    model.load_state_dict(reference.state_dict())
    engine, zero = backend.wrap(model, optimizer, PLAN)
    backend.load_optimizer_state_dict(zero, plain.state_dict())
    for index, values in backend.optimizer_state_dict(zero)["state"].items():
        for key, value in values.items():
            torch.testing.assert_close(value, plain.state_dict()["state"][index][key], msg=f"{index} {key}")
    train_plain(reference, plain, inputs[4:])
    train_with(backend, engine, zero, inputs[4:])
    for key, value in whole_weights(backend, model).items():
        torch.testing.assert_close(value, reference.state_dict()[key], msg=key)


def test_a_state_of_another_model_is_refused(started):
    backend = started(2)
    model, optimizer = model_and_adamw()
    _, zero = backend.wrap(model, optimizer, PLAN)
    other = nn.Linear(5, 7)
    state = torch.optim.AdamW([{"params": [other.weight]}, {"params": [other.bias]}]).state_dict()
    with pytest.raises(
        ValueError, match=r"parameter groups of \[1, 1\] parameters; this model's optimizer has \[2, 2\]"
    ):
        backend.load_optimizer_state_dict(zero, state)


def test_engine_files_are_read_only_by_a_run_that_can(started, tmp_path: Path):
    backend = started(2)
    model, optimizer = model_and_adamw()
    engine, zero = backend.wrap(model, optimizer, PLAN)
    train_with(backend, engine, zero, batches(2))
    directory = tmp_path / "engine"
    assert backend.save_engine_state(directory) is True
    saved = json.loads((directory / engine_state.MANIFEST).read_text())
    assert {k: saved[k] for k in engine_state.MATCHING} == {
        "zero_stage": 2,
        "world_size": 1,
        "precision": "fp32",
        "offload": False,
    }
    assert engine_state.why_not_readable(directory, saved) is None
    for key, other in (("zero_stage", 3), ("world_size", 2), ("precision", "bf16"), ("offload", True)):
        reason = engine_state.why_not_readable(directory, {**saved, key: other})
        assert reason == f"DeepSpeed's checkpoint was written with {key} {saved[key]!r} (now {other!r})"
    assert "holds no DeepSpeed checkpoint" in engine_state.why_not_readable(tmp_path / "none", saved)
    # a manifest of another stage: the trainer falls back to the ordinary checkpoint
    (directory / engine_state.MANIFEST).write_text(json.dumps({**saved, "zero_stage": 3}))
    assert backend.load_engine_state(directory) is False


def test_engine_files_are_loaded_without_unpickling_arbitrary_objects(started, tmp_path: Path, monkeypatch):
    backend = started(1)
    model, optimizer = model_and_adamw()
    engine, zero = backend.wrap(model, optimizer, PLAN)
    train_with(backend, engine, zero, batches(2))
    backend.save_engine_state(tmp_path / "engine")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert backend.load_engine_state(tmp_path / "engine") is True
    assert calls and all(weights_only is True for weights_only in calls)
    # a file holding another class is refused
    path = next((tmp_path / "engine" / engine_state.TAG).glob("*optim_states.pt"))
    torch.save({"payload": Path("x")}, path)
    with pytest.raises(Exception, match="Unsupported global"):
        backend.load_engine_state(tmp_path / "engine")


def test_the_fp16_loss_scale_resumes_with_the_engine(started, tmp_path: Path):
    backend = started(2)
    model, optimizer = model_and_adamw()
    engine, zero = backend.wrap(model, optimizer, StepPlan(micro_batch_size=4, ga_steps=2, precision="fp16"))
    scaler = zero.torch_autocast_gradscaler
    assert scaler is not None and scaler.is_enabled()
    with torch.autocast("cpu", dtype=torch.float16):
        train_with(backend, engine, zero, batches(2))
    scaler.update(1024.0)  # as after overflows
    backend.save_engine_state(tmp_path / "engine")
    assert (
        json.loads((tmp_path / "engine" / engine_state.MANIFEST).read_text())["grad_scaler"]["scale"]
        == 1024.0
    )
    scaler.update(8.0)
    assert backend.load_engine_state(tmp_path / "engine") is True
    assert scaler.get_scale() == 1024.0


def test_a_later_engine_in_the_process_forgets_fp16(started):
    """DeepSpeed keeps the autocast dtype in a module global; shutdown clears it."""
    backend = started(1)
    model, optimizer = model_and_adamw()
    backend.wrap(model, optimizer, StepPlan(micro_batch_size=4, precision="fp16"))
    backend.shutdown()
    backend = started(1)
    model, optimizer = model_and_adamw()
    _, zero = backend.wrap(model, optimizer, StepPlan(micro_batch_size=4))
    assert zero.torch_autocast_gradscaler is None


@pytest.mark.parametrize("stage", STAGES)
def test_the_learning_rate_written_into_the_groups_is_the_one_zero_steps_with(stage, started, tmp_path):
    """The trainer's schedule writes ``group["lr"]`` into the optimizer it built, every step:
    ZeRO must step with it, also after DeepSpeed's files were loaded (which replaces the
    groups' dicts)."""
    backend = started(stage)
    model, client = model_and_adamw()
    engine, zero = backend.wrap(model, client, PLAN)
    inputs = batches(6)

    def step_at(lr: float) -> bool:
        """Whether an optimizer step at ``lr`` (weight decay included) moves any weight."""
        for group in client.param_groups:
            group["lr"] = lr
        before = whole_weights(backend, model)
        train_with(backend, engine, zero, inputs[:2])
        return any(not torch.equal(before[k], v) for k, v in whole_weights(backend, model).items())

    assert step_at(0.01) and not step_at(0.0)
    backend.save_engine_state(tmp_path / "engine")
    assert backend.load_engine_state(tmp_path / "engine") is True
    assert not step_at(0.0) and step_at(0.01)
