"""The training loop's exact numbers, driven in-process with a one-weight model whose loss is
``w * x`` (so every gradient is the micro-batch's ``x``):

- each optimizer step applies the schedule's rate for that step to the mean gradient of its
  ``--ga-steps`` micro-batches, clipped to ``--clip-grad-norm`` when set;
- every ``--log-every`` steps, and at every save, one record holds the mean loss of the
  micro-batches since the last record, the rate, the epoch, the task's status, samples/s and
  tokens/s; samples are written every ``--sample-every`` steps and at the end, logged at their
  step; checkpoints are saved every ``--save-every-n-steps`` and at the end; the `Outcome`
  names the last step, checkpoint and loss;
- a resume restores the optimizer, schedule, loss scaler, data position and RNG, continues the
  progress bar at its step, and one at the last step is refused;
- the progress bar follows the terminal's width and redraws about twice a second;
- the running loss lives on the model's device, not the default one;
- `rng_state` / `set_rng_state` save and restore every CUDA generator when there is CUDA.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import tqdm.std
from torch import nn

from dalle_core.backends import SingleProcessBackend
from dalle_core.pretrained import PretrainedMixin
from dalle_train.errors import TrainError
from dalle_train.training import loop, rng
from dalle_train.training.checkpoints import load_state
from dalle_train.training.layout import CHECKPOINTS, LATEST
from dalle_train.training.loop import LoopSettings, Outcome, Task, train
from dalle_train.training.optim import Schedule, lr_factor
from dalle_train.training.precision import Precision

CPU = torch.device("cpu")
BATCH = 3  # samples per micro-batch
TOKENS = 5  # tokens per sample


class Weight(PretrainedMixin, nn.Module):
    """One trainable number, saved like any model."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.config: dict[str, Any] = {}


class Numbers:
    """Micro-batch ``i`` is the number ``i + 1``; resumable by its position."""

    batches_per_epoch = 4

    def __init__(self) -> None:
        self.position = 0

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def __iter__(self):
        while True:
            self.position += 1
            yield float(self.position)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


class Linear(Task):
    """Loss ``w * x``; writes (pretend) samples with a score; reports a status number."""

    name, tokens_per_sample = "loopy", TOKENS

    def __init__(self, noise: bool = False) -> None:
        self.model, self.noise, self.sampled = Weight(), noise, []

    def loss(self, batch: float, step: int) -> torch.Tensor:
        scale = 1.0 + (torch.rand(()) + random.random()) * 1e-3 if self.noise else 1.0  # RNG-dependent
        return (self.model.w * batch * scale).sum()

    def batch_size(self, batch: float) -> int:
        return BATCH

    def status(self, step: int) -> dict[str, float]:
        return {"temp": step / 10}

    def write_samples(self, step: int, directory: Path) -> dict[str, Path | float]:
        self.sampled.append((step, self.model.training))
        return {"score": step + 0.5, "grid": directory / f"grid-{step}.png"}


class Records:
    """Stands in for `MetricsLog`: keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.calls.append(("log", step, values))

    def image(self, step: int, name: str, path: Path) -> None:
        self.calls.append(("image", step, name, path))

    def losses(self) -> dict[int, float]:
        return {c[1]: c[2]["loss"] for c in self.calls if c[0] == "log" and "loss" in c[2]}


def reference(steps: int, ga: int, lrs: list[float], clip: float | None) -> tuple[float, list[list[float]]]:
    """The weight after ``steps`` SGD steps and each step's micro-batch losses, in float64."""
    w, x, losses = 1.0, 0.0, []
    for step in range(steps):
        xs = [x + 1 + i for i in range(ga)]
        x += ga
        losses.append([w * v for v in xs])
        grad = sum(xs) / ga
        if clip:
            grad *= min(clip / (abs(grad) + 1e-6), 1.0)
        w -= lrs[step] * grad
    return w, losses


def run(tmp_path: Path, task: Linear, settings: LoopSettings, *, schedule: str = "cosine", warmup: int = 2,
        lr: float = 0.01, resume: dict[str, Any] | None = None,
        total: int | None = None) -> tuple[Outcome, Records, Schedule]:
    optimizer = torch.optim.SGD(task.model.parameters(), lr=lr)
    schedule_ = Schedule(optimizer, schedule, total or settings.max_steps, warmup)
    records = Records()
    outcome = train(task, Numbers(), optimizer, schedule_, settings, tmp_path, records, {"config": {}},
                    resume)
    return outcome, records, schedule_


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's clock: started at 100 s, then 4 s later at each reading."""
    readings = iter(100.0 + 4 * i for i in range(1000))
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: next(readings)))


def test_records_samples_checkpoints_and_outcome_are_exact(tmp_path: Path, clock: None, capsys) -> None:
    task = Linear()
    settings = LoopSettings(Precision("fp32", CPU), max_steps=5, ga_steps=2, save_every=4, log_every=2,
                            sample_every=3)
    outcome, records, _ = run(tmp_path, task, settings)
    lrs = [0.01 * lr_factor(s, 5, 2, "cosine", 0.98) for s in range(5)]
    w, losses = reference(5, 2, lrs, None)
    assert task.model.w.item() == pytest.approx(w, rel=1e-6, abs=1e-6)

    def mean(steps: range) -> float:
        return pytest.approx(sum(sum(losses[s]) for s in steps) / (2 * len(steps)), rel=1e-6)

    def logged(step: int, first: int, seconds: float) -> tuple[Any, ...]:
        samples = step * 2 * BATCH
        return ("log", step, {"loss": mean(range(first - 1, step)), "lr": pytest.approx(lrs[step - 1]),
                              "epoch": step * 2 // 4, "temp": step / 10,
                              "samples_per_s": round(samples / seconds, 2),
                              "tokens_per_s": round(samples * TOKENS / seconds, 2)})

    grids = tmp_path / "samples"
    assert records.calls == [
        logged(2, 1, 4.0),
        ("log", 3, {"score": 3.5}), ("image", 3, "grid", grids / "grid-3.png"),
        logged(4, 3, 8.0),
        logged(5, 5, 12.0),
        ("log", 5, {"score": 5.5}), ("image", 5, "grid", grids / "grid-5.png"),
    ]
    assert task.sampled == [(3, False), (5, False)]  # in eval mode
    assert task.model.training
    checkpoints = tmp_path / CHECKPOINTS
    assert sorted(p.name for p in checkpoints.iterdir()) == [LATEST, "step-4", "step-5"]
    assert outcome == Outcome(5, checkpoints / "step-5", None, records.losses()[5])
    state = load_state(checkpoints / "step-4")
    assert state["step"] == 4 and state["data"] == {"position": 8} and state["run"] == {"config": {}}
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert bar.startswith("loopy: 100%") and "| 5/5 [" in bar


@pytest.mark.parametrize("ga, clip, precision", [(1, None, "fp32"), (3, None, "fp32"), (2, 1.0, "fp32"),
                                                 (2, 100.0, "fp32"), (2, 1.0, "fp16")])
def test_each_step_applies_its_rate_to_the_mean_clipped_gradient(tmp_path: Path, clock: None, ga: int,
                                                                 clip: float | None, precision: str) -> None:
    task = Linear()  # fp16: the loss is scaled, and the gradients unscaled before clipping
    settings = LoopSettings(Precision(precision, CPU), max_steps=4, ga_steps=ga, clip_grad_norm=clip,
                            save_every=100, log_every=1)
    _, records, _ = run(tmp_path, task, settings, lr=0.05)
    lrs = [0.05 * lr_factor(s, 4, 2, "cosine", 0.98) for s in range(4)]
    w, losses = reference(4, ga, lrs, clip)
    assert task.model.w.item() == pytest.approx(w, rel=1e-6, abs=1e-6)
    assert records.losses() == {s + 1: pytest.approx(sum(losses[s]) / ga, rel=1e-6) for s in range(4)}
    assert [c[2]["lr"] for c in records.calls if c[0] == "log" and "lr" in c[2]] == pytest.approx(lrs)


def test_a_step_leaves_alone_the_parameters_its_loss_does_not_use(tmp_path: Path) -> None:
    class TwoWeights(Weight):
        def __init__(self) -> None:
            super().__init__()
            self.v = nn.Parameter(torch.ones(1))

    class FirstStepOnly(Linear):
        def __init__(self) -> None:
            super().__init__()
            self.model = TwoWeights()  # saved and reloaded as it is (the first save is read back)

        def loss(self, batch: float, step: int) -> torch.Tensor:
            return super().loss(batch, step) + (self.model.v.sum() if step == 0 else 0.0)

    task = FirstStepOnly()
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=0.1, weight_decay=0.5)
    settings = LoopSettings(Precision("fp32", CPU), max_steps=3, log_every=1)
    train(task, Numbers(), optimizer, Schedule(optimizer, "constant", 3), settings, tmp_path, Records(), {})
    after_one = 1.0 - 0.1 * 0.5 * 1.0 - 0.1 * 1.0  # decoupled decay, then Adam's first step is lr * sign
    assert task.model.v.item() == pytest.approx(after_one, rel=1e-6)  # steps 2 and 3 did not move it
    assert all(p.grad is None for p in task.model.parameters())


def test_nan_loss_before_any_checkpoint_says_none_was_saved(tmp_path: Path) -> None:
    class Nan(Linear):
        def loss(self, batch: float, step: int) -> torch.Tensor:
            return super().loss(batch, step) * float("nan")

    with pytest.raises(TrainError) as caught:
        run(tmp_path, Nan(), LoopSettings(Precision("fp32", CPU), max_steps=5, save_every=2, log_every=1))
    assert str(caught.value) == ("the loss became nan by step 1; none was saved. Lower --learning-rate, "
                                 "set --clip-grad-norm, or use --precision bf16/fp32")
    assert caught.value.exit_code == 3 and not (tmp_path / CHECKPOINTS / LATEST).exists()


def test_resume_restores_everything_and_continues_the_bar(tmp_path: Path, capsys) -> None:
    fp16 = Precision("fp16", CPU)
    settings = LoopSettings(fp16, max_steps=4, save_every=2, log_every=1)
    torch.manual_seed(0)
    random.seed(0)
    straight = Linear(noise=True)
    _, whole, _ = run(tmp_path / "whole", straight, settings, schedule="plateau", lr=0.05)

    torch.manual_seed(0)
    random.seed(0)
    first = Linear(noise=True)
    halfway = LoopSettings(fp16, max_steps=2, save_every=2, log_every=1)
    run(tmp_path / "cut", first, halfway, schedule="plateau", lr=0.05, total=4)
    state = load_state(tmp_path / "cut" / CHECKPOINTS / "step-2")
    state["scaler"] = {**state["scaler"], "scale": 4.0, "_growth_tracker": 7}
    state["schedule"]["plateau"]["factor"] = 0.5  # as if the plateau rule had halved the rate
    torch.manual_seed(123)  # the RNG comes from the checkpoint, not from here
    random.seed(123)
    resumed = Linear(noise=True)
    resumed.model.load_state_dict(first.model.state_dict())
    capsys.readouterr()
    outcome, records, _ = run(tmp_path / "cut", resumed, settings, schedule="plateau", lr=0.05, resume=state)

    assert outcome.step == 4 and sorted(records.losses()) == [3, 4]
    assert [c[2]["lr"] for c in records.calls if "lr" in c[2]] == [0.025, 0.025]  # halved rate restored
    # the same data and random numbers as the straight run: the loss of step 3 is the straight one
    assert records.losses()[3] == pytest.approx(whole.losses()[3], rel=1e-6, abs=0)
    saved = load_state(tmp_path / "cut" / CHECKPOINTS / "step-4")
    assert saved["scaler"]["scale"] == 4.0 and saved["scaler"]["_growth_tracker"] == 9
    assert saved["data"] == {"position": 4}
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert "| 2/4 [" in bar[0] and "| 4/4 [" in bar[-1]

    with pytest.raises(TrainError, match=r"^the checkpoint is at step 4 and this run stops at step 4: "
                                         r"raise --max-steps or --epochs to train further$"):
        run(tmp_path / "cut", Linear(), settings, resume=saved)


def test_bar_follows_the_terminal_width_and_redraws_about_twice_a_second(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def fileno(self) -> int:
            return 2

    terminal, width, now = Terminal(), [60], [1000.0]
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((width[0], 20)))
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])

    class Slow(Linear):
        def loss(self, batch: float, step: int) -> torch.Tensor:
            now[0] += 0.3  # a step takes 0.3 s
            if step == 5:
                width[0] = 100  # the terminal is widened half-way
            return super().loss(batch, step)

    run(tmp_path, Slow(), LoopSettings(Precision("fp32", CPU), max_steps=10, log_every=100, save_every=100))
    frames = [frame.rstrip("\n") for frame in terminal.getvalue().split("\r") if frame.strip()]
    assert 2 + 3 <= len(frames) <= 2 + 6  # the first and last, and one per 0.5 to 1 s of the 3 s
    assert len(frames[0]) == 59 and len(frames[-1]) == 99
    assert frames[-1].startswith("loopy: 100%|") and "| 10/10 [" in frames[-1]
    assert "<00:00,  3.33step/s, loss=" in frames[-1]  # 10 steps in 3 s


def test_running_loss_is_on_the_models_device(tmp_path: Path) -> None:
    task = Linear()
    settings = LoopSettings(Precision("fp32", CPU), max_steps=1, log_every=1)

    class Stop(Exception):
        pass

    class FirstRecord(Records):
        def log(self, step: int, values: dict[str, Any]) -> None:
            super().log(step, values)
            raise Stop

    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1)
    records = FirstRecord()
    with torch.device("meta"), pytest.raises(Stop):  # another default device than the model's
        train(task, Numbers(), optimizer, Schedule(optimizer, "constant", 1), settings, tmp_path, records, {})
    assert records.calls[0][2]["loss"] == 1.0


def test_rng_state_saves_and_restores_every_cuda_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    cuda_states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3], dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = rng.rng_state()
    assert set(state) == {"python", "torch", "cuda"} and state["cuda"] is cuda_states
    drawn = (random.random(), torch.rand(3))
    rng.set_rng_state(state)
    assert calls == [cuda_states]
    assert random.random() == drawn[0] and torch.equal(torch.rand(3), drawn[1])
    rng.set_rng_state({"python": state["python"], "torch": state["torch"]})  # saved without CUDA
    assert calls == [cuda_states]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert set(rng.rng_state()) == {"python", "torch"}
    rng.set_rng_state(state)  # saved with CUDA, restored without: CUDA is left alone
    assert calls == [cuda_states]


def test_total_steps() -> None:
    settings = LoopSettings(Precision("fp32", CPU), epochs=3, ga_steps=2)
    assert settings.total_steps(5) == 7  # 3 * 5 // 2
    assert LoopSettings(Precision("fp32", CPU), epochs=1, ga_steps=4).total_steps(2) == 1  # at least 1
    assert LoopSettings(Precision("fp32", CPU), epochs=3, max_steps=2).total_steps(100) == 2
    assert settings.total_steps(0) == 1


class StoppedAtStep(Linear):
    """Sends this process SIGTERM while computing the loss of step ``at`` (the loop's stop
    handler turns it into a request to stop after that step)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def loss(self, batch: float, step: int) -> torch.Tensor:
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().loss(batch, step)


def test_a_stopped_run_returns_its_checkpoint_and_last_loss(tmp_path: Path) -> None:
    settings = LoopSettings(Precision("fp32", CPU), max_steps=10, save_every=100, log_every=100)
    outcome, records, _ = run(tmp_path, StoppedAtStep(at=2), settings, schedule="constant", warmup=0)
    assert (outcome.step, outcome.interrupted_by) == (3, signal.SIGTERM)
    assert outcome.checkpoint == tmp_path / CHECKPOINTS / "step-3"
    assert outcome.last_loss == records.losses()[3]


def test_rates_are_samples_over_the_seconds_so_far(tmp_path: Path, monkeypatch, capsys) -> None:
    """Under a second per step (0.7 s on this clock): the rate is not clamped to one second."""
    readings = iter(100.0 + 0.7 * i for i in range(1000))
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    settings = LoopSettings(Precision("fp32", CPU), max_steps=2, save_every=100, log_every=1)
    _, records, _ = run(tmp_path, Linear(), settings, schedule="constant", warmup=0)
    rates = [c[2]["samples_per_s"] for c in records.calls if c[0] == "log" and "loss" in c[2]]
    assert rates == [round(BATCH / 0.7, 2), round(2 * BATCH / 1.4, 2)] == [4.29, 4.29]
    assert "samples/s=4.3" in capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]


# ----------------------------------------------------------------------------- several processes


class SecondOfTwo(SingleProcessBackend):
    """Rank ``rank`` of two, in this process: the other process's objects are ``other`` (by
    default this one's, with its data position ``other_data`` when given); records barriers,
    accumulation boundaries and backward calls; ``stop_at``: the step at which `any` says that
    some process was asked to stop."""

    plugin_name = "two"

    def __init__(self, rank: int = 1, other: Any = None, stop_at: int | None = None,
                 other_data: Any = None) -> None:
        self._rank, self.other, self.stop_at, self.other_data = rank, other, stop_at, other_data
        self.barriers, self.syncs, self.backwards, self.asked = 0, [], 0, 0

    world_size = 2

    @property
    def rank(self) -> int:
        return self._rank

    def barrier(self) -> None:
        self.barriers += 1

    def accumulating(self, model, sync):
        self.syncs.append((model, sync))
        return super().accumulating(model, sync)

    def backward(self, loss, scaler):
        self.backwards += 1
        super().backward(loss, scaler)

    def any(self, flag: bool) -> bool:
        self.asked += 1
        return flag or self.asked == self.stop_at

    def gather_object(self, obj: Any) -> list[Any]:
        other = self.other if self.other is not None else obj
        if self.other_data is not None:  # the loop gathers (generators, weights, data position)
            other = (*other[:2], self.other_data)
        mine = [obj, other]
        return mine if self._rank == 0 else mine[::-1]


def test_a_process_other_than_the_root_writes_nothing_and_waits_at_each_save(tmp_path: Path,
                                                                          capsys) -> None:
    task, backend = Linear(), SecondOfTwo(rank=1)
    settings = LoopSettings(Precision("fp32", CPU), max_steps=4, ga_steps=3, save_every=2, log_every=1,
                            sample_every=1)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    outcome = train(task, Numbers(), optimizer, Schedule(optimizer, "constant", 4), settings, tmp_path,
                    Records(), {}, backend=backend)
    assert not (tmp_path / CHECKPOINTS).exists() and task.sampled == []
    assert outcome.checkpoint == tmp_path / CHECKPOINTS / "step-4" and outcome.step == 4
    assert backend.barriers == 4  # at each save (steps 2 and 4): staging directory made, checkpoint complete
    assert task.wrapped is task.model  # what this backend's wrap returned
    assert backend.syncs == [(task.wrapped, False), (task.wrapped, False), (task.wrapped, True)] * 4
    assert backend.backwards == 12
    assert "loopy" not in capsys.readouterr().err  # no progress bar either


def test_a_process_resuming_a_run_of_another_size_reseeds_from_the_step(tmp_path: Path) -> None:
    settings = LoopSettings(Precision("fp32", CPU), max_steps=2, save_every=2)
    first = Linear()
    optimizer = torch.optim.SGD(first.model.parameters(), lr=0.01)
    train(first, Numbers(), optimizer, Schedule(optimizer, "constant", 4), settings, tmp_path, Records(), {})
    state = load_state(tmp_path / CHECKPOINTS / "step-2")  # one process's
    task = Linear(noise=True)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    later = LoopSettings(Precision("fp32", CPU), max_steps=3, save_every=100)
    drawn = []
    original = task.loss
    task.loss = lambda batch, step: drawn.append(torch.get_rng_state()) or original(batch, step)
    train(task, Numbers(), optimizer, Schedule(optimizer, "constant", 4), later, tmp_path / "b", Records(),
          {}, state, backend=SecondOfTwo(rank=1))
    rng.seed_everything(2 * 1_000_003 + 1)
    assert torch.equal(drawn[0], torch.get_rng_state())


def test_the_root_saves_every_process_generators_and_checks_their_weights(tmp_path: Path) -> None:
    other_rng = rng.rng_state()
    other_rng["python"] = random.Random(7).getstate()
    task = Linear()
    settings = LoopSettings(Precision("fp32", CPU), max_steps=2, save_every=2)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    backend = SecondOfTwo(rank=0, other=(other_rng, [2.0], {"position": 2}))  # another weight than this one's
    message = (r"^at step 2 the weights of process\(es\) \[1\] differ from process 0's: the two backend did "
               r"not keep them in step; nothing was saved$")
    with pytest.raises(TrainError, match=message):
        train(task, Numbers(), optimizer, Schedule(optimizer, "constant", 2), settings, tmp_path, Records(),
              {}, backend=backend)
    assert not (tmp_path / CHECKPOINTS / LATEST).exists()

    def two_steps(task: Linear, out: Path, backend: Any = None) -> dict[str, Any]:
        optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
        train(task, Numbers(), optimizer, Schedule(optimizer, "constant", 2), settings, out, Records(), {},
              backend=backend)
        return load_state(out / CHECKPOINTS / "step-2")

    state = two_steps(Linear(), tmp_path / "b", SecondOfTwo(rank=0))
    assert len(state[loop.RNG_BY_RANK]) == 2
    assert state["rng"]["python"] == state[loop.RNG_BY_RANK][0]["python"]
    single = two_steps(Linear(), tmp_path / "c")
    assert loop.RNG_BY_RANK not in single  # one process: as before
    assert loop.DATA_BY_RANK not in state  # both processes are at the same data position


class Positions(Numbers):
    """`Numbers` whose position is saved as this process's (streamed shards are one per process)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.loaded: list[dict[str, int]] = []

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "rank": self.rank}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loaded.append(state)
        super().load_state_dict(state)


def test_differing_data_positions_are_saved_by_rank_and_each_process_resumes_its_own(tmp_path: Path) -> None:
    settings = LoopSettings(Precision("fp32", CPU), max_steps=2, save_every=2)
    task = Linear()
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    backend = SecondOfTwo(rank=0, other_data={"position": 7, "rank": 1})
    train(task, Positions(0), optimizer, Schedule(optimizer, "constant", 2), settings, tmp_path, Records(),
          {}, backend=backend)
    state = load_state(tmp_path / CHECKPOINTS / "step-2")
    assert state[loop.DATA_BY_RANK] == [{"position": 2, "rank": 0}, {"position": 7, "rank": 1}]
    assert state["data"] == state[loop.DATA_BY_RANK][0]
    for backend, expected in ((SecondOfTwo(rank=1), {"position": 7, "rank": 1}),  # its own
                              (SingleProcessBackend(), {"position": 2, "rank": 0})):  # another world: "data"
        data = Positions(1)
        task = Linear()
        optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
        later = LoopSettings(Precision("fp32", CPU), max_steps=3, save_every=100)
        train(task, data, optimizer, Schedule(optimizer, "constant", 3), later, tmp_path / "again", Records(),
              {}, state, backend=backend)
        assert data.loaded == [expected]


def test_every_process_stops_when_any_is_asked_to(tmp_path: Path) -> None:
    task, backend = Linear(), SecondOfTwo(rank=0, stop_at=2)
    settings = LoopSettings(Precision("fp32", CPU), max_steps=10, save_every=100, log_every=100)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    outcome = train(task, Numbers(), optimizer, Schedule(optimizer, "constant", 10), settings, tmp_path,
                    Records(), {}, backend=backend)
    assert outcome.step == 2 and outcome.checkpoint == tmp_path / CHECKPOINTS / "step-2"
    assert backend.asked == 2


def test_rates_count_the_samples_of_every_process(tmp_path: Path) -> None:
    task, records = Linear(), Records()
    settings = LoopSettings(Precision("fp32", CPU), max_steps=1, log_every=1)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    clock = iter([100.0, 102.0])
    original = loop.time.perf_counter
    loop.time.perf_counter = lambda: next(clock)
    try:
        train(task, Numbers(), optimizer, Schedule(optimizer, "constant", 1), settings, tmp_path, records, {},
              backend=SecondOfTwo(rank=0))
    finally:
        loop.time.perf_counter = original
    values = records.calls[0][2]
    assert values["samples_per_s"] == 2 * BATCH / 2 and values["tokens_per_s"] == 2 * BATCH * TOKENS / 2


@pytest.mark.parametrize("world,rank", [(2, 1), (3, 0), (3, 2)])
def test_resumed_generators_per_process(world: int, rank: int) -> None:
    saved = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        random.seed(seed)
        saved.append(rng.rng_state())
    backend = SecondOfTwo(rank=rank)
    backend.world_size = world
    loop._resume_rng({"rng": saved[0], loop.RNG_BY_RANK: saved}, backend, step=4)
    drawn = torch.rand(2)
    if world == 2:  # the same number of processes: each its own generators
        rng.set_rng_state(saved[rank])
    else:  # another: the root's, others reseeded from (step, rank)
        rng.set_rng_state(saved[0])
        if rank:
            rng.seed_everything(4 * 1_000_003 + rank)
    assert torch.equal(drawn, torch.rand(2))


# ----------------------------------------------------------------------- engines with their own state


class ShardingEngine(SingleProcessBackend):
    """Stands in for an engine that shards the weights (FSDP, ZeRO-3) and keeps the optimizer's
    state in its own files (DeepSpeed): records the order of its collective calls, writes a
    marker as its state and reads it back when ``readable``."""

    plugin_name, replicated = "sharding", False

    def __init__(self, readable: bool = True) -> None:
        self.readable, self.calls, self.inside = readable, [], False

    def wrap(self, model, optimizer, plan):
        self.calls.append(("wrap", plan))
        return model, optimizer

    @contextlib.contextmanager
    def gathered(self, model):
        self.calls.append("gathered")
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def optimizer_state_dict(self, optimizer):
        self.calls.append("optimizer_state_dict")
        return None

    def load_optimizer_state_dict(self, optimizer, state):
        self.calls.append(("load_optimizer_state_dict", state))

    def save_engine_state(self, directory: Path) -> bool:
        self.calls.append(("save_engine_state", directory.parent.name))
        directory.mkdir()
        (directory / "marker").write_text(str(torch.get_rng_state().sum().item()))
        return True

    def load_engine_state(self, directory: Path) -> bool:
        self.calls.append(("load_engine_state", directory.parent.name))
        return self.readable and (directory / "marker").is_file()


def engine_run(tmp_path: Path, backend: ShardingEngine, task: Task, max_steps: int, resume: Any = None,
               resume_dir: Path | None = None) -> Outcome:
    settings = LoopSettings(Precision("fp32", CPU), batch_size=BATCH, max_steps=max_steps, ga_steps=2,
                            clip_grad_norm=0.25, save_every=2, log_every=1, sample_every=1)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    return train(task, Numbers(), optimizer, Schedule(optimizer, "constant", max_steps), settings, tmp_path,
                 Records(), {}, resume, backend, resume_dir)


def test_an_engine_is_told_the_plan_and_its_state_is_saved_beside_the_whole_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend, task = ShardingEngine(), Linear()
    saved_inside: list[bool] = []
    real_save = Weight.save_pretrained

    def save_pretrained(self: Weight, directory: Path) -> None:
        saved_inside.append(backend.inside)
        real_save(self, directory)

    monkeypatch.setattr(Weight, "save_pretrained", save_pretrained)
    outcome = engine_run(tmp_path, backend, task, max_steps=4)
    assert backend.calls[0] == ("wrap", loop.StepPlan(micro_batch_size=BATCH, ga_steps=2, clip_grad_norm=0.25,
                                                      precision="fp32"))
    # per save: the optimizer's state, the engine's files in the staging directory, then the weights
    # written while the engine holds them whole
    per_save = ["optimizer_state_dict", ("save_engine_state", ".tmp-step-{}"), "gathered"]
    assert backend.calls[1:] == [c if isinstance(c, str) else (c[0], c[1].format(at))
                                 for at in (2, 4) for c in per_save]
    assert saved_inside == [True, True]
    step_4 = tmp_path / CHECKPOINTS / "step-4"
    assert outcome.checkpoint == step_4 and (step_4 / "engine" / "marker").is_file()
    assert load_state(step_4)["optimizer"] is None
    assert not list((tmp_path / CHECKPOINTS).glob(".tmp-*"))
    # a sharded model's forward is collective: samples come from the checkpoints, reloaded
    assert [step for step, _ in task.sampled] == [2, 4]


def test_a_resume_restores_the_engine_state_else_the_ordinary_state_else_says_what_restarts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine_run(tmp_path, ShardingEngine(), Linear(), max_steps=2)
    step_2 = tmp_path / CHECKPOINTS / "step-2"
    state = load_state(step_2)
    readable = ShardingEngine()
    engine_run(tmp_path / "a", readable, Linear(), 4, state, step_2)
    assert ("load_engine_state", "step-2") in readable.calls
    assert not any(c[0] == "load_optimizer_state_dict" for c in readable.calls if isinstance(c, tuple))
    capsys.readouterr()
    unreadable = ShardingEngine(readable=False)
    engine_run(tmp_path / "b", unreadable, Linear(), 4, state, step_2)
    out = capsys.readouterr().out
    assert f"{step_2}: the optimizer's state was saved only in its engine's own files" in out
    assert "the sharding backend with 1 process(es) cannot read" in out
    assert "the optimizer's moments start again" in out
    ordinary = ShardingEngine(readable=False)
    engine_run(tmp_path / "c", ordinary, Linear(), 4, {**state, "optimizer": {"from": "ddp"}}, step_2)
    assert ("load_optimizer_state_dict", {"from": "ddp"}) in ordinary.calls
    assert "moments start again" not in capsys.readouterr().out


class NewOptimizer(SingleProcessBackend):
    """Wraps the optimizer in a new object with its own groups (as Horovod's and DeepSpeed's do)."""

    def wrap(self, model, optimizer, plan):
        return model, torch.optim.SGD(model.parameters(), lr=0.5)


def test_the_schedule_sets_the_rate_of_the_optimizer_the_backend_returned(tmp_path: Path) -> None:
    task = Linear()
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    settings = LoopSettings(Precision("fp32", CPU), max_steps=2, save_every=10)
    train(task, Numbers(), optimizer, Schedule(optimizer, "constant", 2), settings, tmp_path, Records(), {},
          backend=NewOptimizer())
    assert float(task.model.w) == pytest.approx(1 - 0.01 * 1 - 0.01 * 2)  # micro-batches 1 and 2


class Misconfigured(SingleProcessBackend):
    plugin_name = "picky"

    def wrap(self, model, optimizer, plan):
        raise ValueError("file says 4, --ga-steps says 1")


def test_a_backend_refusing_its_configuration_is_a_one_line_error_naming_the_flag(tmp_path: Path) -> None:
    task = Linear()
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.01)
    with pytest.raises(TrainError, match=r"^--distributed-backend picky: file says 4, --ga-steps says 1$"):
        train(task, Numbers(), optimizer, Schedule(optimizer, "constant", 2),
              LoopSettings(Precision("fp32", CPU), max_steps=2), tmp_path, Records(), {},
              backend=Misconfigured())
