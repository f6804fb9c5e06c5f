"""What ``--resume`` promises, checked so that a broken promise fails a test.

- Exact resume: a run stopped and resumed several times ends with the same weights (bit for
  bit, on the CPU), the same loss, learning rate, epoch and temperature at every step, and the
  same training state (Adam moments, schedule, data position, RNG) as a run that never
  stopped, with randomness drawn after every resume (dropout, caption dropping, Gumbel codes).
- A SIGTERM at any point of a step saves a checkpoint of the step the run stops at.
- Safe loading: a checkpoint file whose loading would run code is refused with a one-line
  error naming it, and the code does not run.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHAPES, TINY_VAE, assert_same_weights, dalle_args

from dalle_core.testing.pickles import PAYLOADS, write_code_pickle
from dalle_train.cli import main
from dalle_train.tasks.dalle import DalleTask
from dalle_train.tasks.vae import VaeTask
from dalle_train.training.checkpoints import STATE_FILE, load_state
from dalle_train.training.layout import CHECKPOINTS, LATEST, TRAINING_STATE
from dalle_train.training.metrics import MetricsLog

SIGTERM_EXIT = 128 + signal.SIGTERM
#: everything a DALLE step draws at random, two micro-batches a step, a cosine schedule with
#: warm-up, and 6 batches an epoch: the 7 steps cross two epoch ends (after steps 3 and 6)
DALLE_RUN = ["--attn-dropout", "0.2", "--ff-dropout", "0.2", "--null-cond-prob", "0.5", "--ga-steps", "2",
             "--lr-schedule", "cosine", "--warmup-steps", "3", "--dataset-size", "24", "--max-steps", "7",
             "--log-every", "1"]
#: the plateau schedule (the one with state), and a temperature that anneals at step 100
VAE_RUN = ["vae", *SHAPES, *TINY_VAE, "--lr-decay", "--anneal-rate", "1e-3", "--log-every", "1"]
#: what a metrics record holds that does not depend on the clock
EXACT_METRICS = ("loss", "lr", "epoch", "temperature")


def logged(out: Path) -> dict[int, dict[str, float]]:
    """The clock-free numbers of every step's metrics record."""
    found = {}
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if "loss" in record:
            found[record["step"]] = {key: record[key] for key in EXACT_METRICS if key in record}
    return found


def latest(out: Path) -> str:
    return (out / CHECKPOINTS / LATEST).read_text().strip()


def assert_same(a: Any, b: Any, where: str) -> None:
    """``a`` and ``b`` equal exactly: tensors value for value (and dtype), containers item by item."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def assert_same_run(whole: Path, resumed: Path, steps: int) -> None:
    """Weights, per-step metrics and the training state of the last checkpoint are identical."""
    final = f"step-{steps}"
    assert latest(whole) == latest(resumed) == final
    assert_same_weights(whole / CHECKPOINTS / final, resumed / CHECKPOINTS / final)
    assert sorted(logged(whole)) == list(range(1, steps + 1))
    assert logged(resumed) == logged(whole)
    saved = [load_state(out / CHECKPOINTS / final) for out in (whole, resumed)]
    # everything but the flags ("run"), which a resumed run takes from its checkpoint
    assert_same(*({key: value for key, value in state.items() if key != "run"} for state in saved), "state")


def sigterm_during(monkeypatch: pytest.MonkeyPatch, task: type, steps: set[int]) -> None:
    """Deliver SIGTERM to this process during the forward pass of optimizer steps ``steps``
    (counted from 1), as a user pressing Ctrl-C mid-step would."""
    real = task.loss

    def loss(self: Any, batch: Any, step: int) -> torch.Tensor:
        if step + 1 in steps:
            signal.raise_signal(signal.SIGTERM)
        return real(self, batch, step)

    monkeypatch.setattr(task, "loss", loss)


def test_dalle_resumes_exactly_after_several_sigterms(tmp_path: Path, vae_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(dalle_args(whole, vae_dir, *DALLE_RUN)) == 0

    sigterm_during(monkeypatch, DalleTask, {2, 4})
    assert main(dalle_args(split, vae_dir, *DALLE_RUN)) == SIGTERM_EXIT
    assert latest(split) == "step-2"
    assert main(["dalle", "--resume", "--output-dir", str(split)]) == SIGTERM_EXIT
    assert latest(split) == "step-4"
    assert main(["dalle", "--resume", "--output-dir", str(split)]) == 0
    assert_same_run(whole, split, 7)


def test_vae_resumes_exactly_when_runs_are_extended(tmp_path: Path) -> None:
    """Each part ends as a finished run (writing its sample pictures) that the next extends."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*VAE_RUN, "--max-steps", "103", "--output-dir", str(whole)]) == 0

    assert main([*VAE_RUN, "--max-steps", "2", "--output-dir", str(split)]) == 0
    for steps in ("100", "103"):
        assert main(["vae", "--resume", "--output-dir", str(split), "--max-steps", steps]) == 0
    assert_same_run(whole, split, 103)
    # the run exercised what it claims to: the temperature annealed, the plateau rule acted
    temperatures = {step: record["temperature"] for step, record in logged(whole).items()}
    assert temperatures[103] < temperatures[1]
    assert load_state(whole / CHECKPOINTS / "step-103")["schedule"]["plateau"]["factor"] < 1


@pytest.mark.parametrize("hook", ["metrics", "samples"])
def test_sigterm_anywhere_in_a_step_saves_the_step_it_stops_at(tmp_path: Path, hook: str, capsys,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The signal arrives after the step's loss was computed: while its metrics or its sample
    pictures are written (step 2)."""
    owner, name = (MetricsLog, "log") if hook == "metrics" else (VaeTask, "write_samples")
    real = getattr(owner, name)

    def signalled(self: Any, step: int, *args: Any) -> Any:
        if step == 2:
            signal.raise_signal(signal.SIGTERM)
        return real(self, step, *args)

    monkeypatch.setattr(owner, name, signalled)
    out = tmp_path / "run"
    argv = [*VAE_RUN, "--max-steps", "10", "--sample-every", "2", "--output-dir", str(out)]
    assert main(argv) == SIGTERM_EXIT
    stopped = int(capsys.readouterr().out.split("stopped by signal 15 at step ")[1].split(";")[0])
    assert stopped in (2, 3)
    assert latest(out) == f"step-{stopped}"


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("target", [f"{TRAINING_STATE}/{STATE_FILE}", "model.safetensors"])
def test_resume_refuses_a_file_whose_loading_runs_code(tmp_path: Path, target: str, payload: type,
                                                       capsys) -> None:
    out = tmp_path / "run"
    assert main([*VAE_RUN, "--max-steps", "1", "--output-dir", str(out)]) == 0
    path = out / CHECKPOINTS / "step-1" / target
    marker = tmp_path / "code-ran"
    write_code_pickle(path, marker, payload, tensors={})
    capsys.readouterr()

    code = main(["vae", "--resume", "--output-dir", str(out), "--max-steps", "2"])
    error = capsys.readouterr().err.strip()
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert code == 2
    assert str(path) in error and "\n" not in error and "Traceback" not in error
    with path.open("rb") as handle:  # a file object: torch hands a *.safetensors path to safetensors
        torch.load(handle, weights_only=False)  # the file is what it claims: an unsafe load runs its code
    assert marker.exists()
