"""Run set-up's promises, checked in-process on the ``vae`` command's flags without training:

- ``--resume`` takes every flag not given from the checkpoint (a path flag as a path), keeps the
  given ones, and refuses given model flags that differ, listing each difference;
  ``--resume`` (or a checkpoint to resume from) and ``--start-fresh`` contradict;
  ``--start-fresh`` deletes the checkpoints; existing checkpoints need one of the two;
- the count flags (and ``--max-steps``) below 1 are refused naming the flag, 1 is accepted;
- every run, loop and logging flag reaches the prepared run; the saved flags are JSON values
  without the ones that only say where and how this process runs;
- `fit` hands the optimizer and schedule flags and the prepared run to the loop, closes the
  metrics whatever happens, and ends with the line and exit code of how the run ended;
- ``--device`` and unreadable checkpoints give one-line errors naming what the user gave.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import SHAPES, TINY_VAE

from dalle_core import DiscreteVAE
from dalle_train.cli import build_parser, given_flags
from dalle_train.commands import common
from dalle_train.commands.common import (
    NOT_SAVED,
    device_from_flag,
    load_model,
    merge_resumed_flags,
    prepare_run,
    saved_flags,
)
from dalle_train.commands.vae import FIXED
from dalle_train.errors import TrainError
from dalle_train.training.checkpoints import save_checkpoint
from dalle_train.training.layout import CHECKPOINTS, LATEST
from dalle_train.training.loop import LoopSettings, Outcome
from dalle_train.training.precision import Precision


def parse(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["vae", *argv])
    args.given = given_flags(["vae", *argv])
    return args


class Metrics:
    """Stands in for `MetricsLog`: records what it was opened with."""

    def __init__(self, out: Path, **options: Any) -> None:
        self.out, self.options = out, options

        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "MetricsLog", Metrics)


def one_line_error(call: Any) -> str:
    with pytest.raises(TrainError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def a_run(out: Path, model: DiscreteVAE, *flags: str) -> dict[str, Any]:
    """``OUT/checkpoints/step-2`` as a run with ``flags`` would have saved it; its state."""
    state = {"step": 2, "run": {"flags": saved_flags(parse(*SHAPES, *TINY_VAE, *flags))}}
    save_checkpoint(out / CHECKPOINTS, 2, model, state, keep=None)
    return state


def test_every_flag_reaches_the_prepared_run(tmp_path: Path, metrics: None) -> None:
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    args = parse(*SHAPES, *TINY_VAE, "--output-dir", str(out), "--threads", str(threads), "--seed", "5",
                 "--device", "cpu", "--precision", "bf16", "--epochs", "3", "--max-steps", "7",
                 "--ga-steps", "2", "--clip-grad-norm", "0.5", "--save-every-n-steps", "4",
                 "--keep-n-checkpoints", "2", "--log-every", "6", "--sample-every", "9", "--tensorboard",
                 "--wandb-name", "proj", "--wandb-entity", "team", "--image-folder", str(tmp_path))
    run = prepare_run(args, FIXED)
    assert run.out == out and run.device == torch.device("cpu") and torch.get_num_threads() == threads
    bf16 = Precision("bf16", torch.device("cpu"))
    assert run.settings == LoopSettings(precision=bf16, epochs=3, max_steps=7, ga_steps=2, clip_grad_norm=0.5,
                                        save_every=4, keep=2, log_every=6, sample_every=9)
    flags = saved_flags(args)
    assert run.config == {"flags": flags} and run.resume_from is None and run.resume_state is None
    assert isinstance(run.metrics, Metrics) and run.metrics.out == out
    assert run.metrics.options == {"tensorboard": True, "wandb_project": "proj", "wandb_entity": "team",
                                   "config": flags}
    assert flags["image_folder"] == str(tmp_path) and flags["seed"] == 5 and "output_dir" not in flags


def test_seed_fp16_spellings_plateau_and_no_clipping(tmp_path: Path, metrics: None) -> None:
    args = parse(*SHAPES, *TINY_VAE, "--output-dir", str(tmp_path), "--seed", "7", "--amp", "--lr-decay",
                 "--clip-grad-norm", "0", "--wandb")
    run = prepare_run(args, FIXED)
    drawn = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(4))
    assert run.settings.precision.name == "fp16" and run.settings.clip_grad_norm is None
    assert args.lr_schedule == "plateau" and run.settings.max_steps is None and run.settings.keep is None
    assert run.metrics.options["wandb_project"] == "dalle-train"
    assert run.metrics.options["tensorboard"] is False
    for spelling in ("--fp16", "--precision fp16"):
        again = prepare_run(parse(*SHAPES, "--output-dir", str(tmp_path), *spelling.split()), FIXED)
        assert again.settings.precision.name == "fp16"
    plain = prepare_run(parse(*SHAPES, "--output-dir", str(tmp_path)), FIXED)
    assert plain.settings.precision.name == "fp32" and plain.metrics.options["wandb_project"] is None
    assert plain.settings.clip_grad_norm is None and plain.settings.epochs == 20


@pytest.mark.parametrize("flag", ["batch_size", "ga_steps", "epochs", "save_every_n_steps", "log_every",
                                  "max_steps"])
def test_counts_below_one_are_refused_naming_the_flag(tmp_path: Path, flag: str, metrics: None) -> None:
    option = f"--{flag.replace('_', '-')}"
    for value in ("0", "-2"):
        args = parse(*SHAPES, "--output-dir", str(tmp_path), option, value)
        with pytest.raises(TrainError, match=f"^{option} must be at least 1, got {value}$"):
            prepare_run(args, FIXED)
    prepare_run(parse(*SHAPES, "--output-dir", str(tmp_path), option, "1"), FIXED)  # 1 is enough


def test_resume_and_start_fresh_contradict(tmp_path: Path, vae_dir: Path, metrics: None, capsys) -> None:
    out = tmp_path / "run"
    a_run(out, DiscreteVAE.from_pretrained(vae_dir))
    message = "--resume and --start-fresh contradict each other: pick one"
    assert one_line_error(lambda: prepare_run(parse("--output-dir", str(out), "--resume", "--start-fresh"),
                                              FIXED)) == message
    from_a_checkpoint = parse("--output-dir", str(out), "--start-fresh")
    from_a_checkpoint.resume_from = out / CHECKPOINTS / "step-2"  # as `dalle --dalle-path` of a run sets it
    assert one_line_error(lambda: prepare_run(from_a_checkpoint, FIXED)) == message
    assert (out / CHECKPOINTS / LATEST).is_file()
    assert one_line_error(lambda: prepare_run(parse(*SHAPES, "--output-dir", str(out)), FIXED)) == (
        f"{out / CHECKPOINTS} already holds checkpoints (latest: step-2): pass --resume to continue that "
        f"run, --start-fresh to replace it, or another --output-dir")
    capsys.readouterr()
    run = prepare_run(parse(*SHAPES, "--output-dir", str(out), "--start-fresh"), FIXED)
    assert capsys.readouterr().out == f"--start-fresh: removed {out / CHECKPOINTS}\n"
    assert not (out / CHECKPOINTS).exists() and run.resume_from is None and run.resume_state is None
    prepare_run(parse(*SHAPES, "--output-dir", str(out), "--start-fresh"), FIXED)  # nothing to remove
    assert capsys.readouterr().out == ""


def test_resume_takes_the_flags_not_given_from_the_checkpoint(tmp_path: Path, vae_dir: Path,
                                                              metrics: None) -> None:
    out, other = tmp_path / "run", tmp_path / "other"
    model = DiscreteVAE.from_pretrained(vae_dir)
    state = a_run(out, model, "--image-folder", "/data/a", "--learning-rate", "0.01", "--seed", "3")
    args = parse("--resume", "--output-dir", str(out), "--max-steps", "9", "--image-size", "32",
                 "--image-folder", "/data/a", "--learning-rate", "0.02")
    run = prepare_run(args, FIXED)
    assert run.resume_from == out / CHECKPOINTS / "step-2" and run.resume_state == state
    assert (args.image_size, args.num_tokens, args.emb_dim, args.seed) == (32, 16, 8, 3)
    assert (args.max_steps, args.learning_rate, args.batch_size) == (9, 0.02, 4)
    assert run.settings.max_steps == 9 and run.config == {"flags": saved_flags(args)}
    # a checkpoint of another run to resume from (`dalle --dalle-path OTHER/checkpoints/step-2`)
    other_state = a_run(other, model, "--seed", "4")
    args = parse("--output-dir", str(tmp_path / "new"))
    args.resume_from = other / CHECKPOINTS / "step-2"
    run = prepare_run(args, FIXED)
    assert run.resume_from == other / CHECKPOINTS / "step-2" and run.resume_state == other_state
    assert args.seed == 4
    args = parse("--output-dir", str(out))
    args.resume_from = None  # as `dalle` without --dalle-path: no resume, and the run exists
    assert "already holds checkpoints" in one_line_error(lambda: prepare_run(args, FIXED))


def test_resume_refuses_differing_model_flags_listing_each(tmp_path: Path, vae_dir: Path,
                                                            metrics: None) -> None:
    out = tmp_path / "run"
    a_run(out, DiscreteVAE.from_pretrained(vae_dir), "--image-folder", "/data/a")
    args = parse("--resume", "--output-dir", str(out), "--image-size", "64", "--image-folder", "/data/b",
                 "--num-layers", "3", "--learning-rate", "0.5")
    assert one_line_error(lambda: prepare_run(args, FIXED)) == (
        "these flags differ from the checkpoint being resumed: --image-folder /data/b (checkpoint: /data/a); "
        "--image-size 64 (checkpoint: 32). Drop them to keep the checkpoint's values, "
        "or pass --start-fresh to begin a new run")


def test_merge_keeps_types_and_takes_flags_this_version_lacks() -> None:
    args = argparse.Namespace(given={"cache"}, cache=Path("/c"), data=Path("default"), depth=2)
    merge_resumed_flags(args, {"cache": "/c", "data": "/saved", "depth": 3, "retired_flag": 1},
                        frozenset({"cache", "depth"}))
    assert args.data == Path("/saved") and isinstance(args.data, Path)
    assert args.cache == Path("/c") and args.depth == 3 and args.retired_flag == 1


def test_saved_flags_are_json_values_without_where_this_process_runs(tmp_path: Path) -> None:
    args = parse(*SHAPES, "--output-dir", str(tmp_path), "--image-folder", str(tmp_path), "--resume",
                 "--device", "cpu")
    flags = saved_flags(args)
    assert not set(flags) & NOT_SAVED and flags["image_folder"] == str(tmp_path)
    assert flags == {key: str(value) if key == "image_folder" else value
                     for key, value in vars(args).items() if key not in NOT_SAVED}
    assert json.loads(json.dumps(flags)) == flags
    args.odd = object()
    with pytest.raises(TypeError):
        saved_flags(args)


def test_device_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_from_flag("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_from_flag("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_from_flag("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError) as torch_error:
        torch.device("nonsense")
    assert one_line_error(lambda: device_from_flag("nonsense")) == (
        f"--device nonsense: not usable here ({str(torch_error.value).splitlines()[0]}); "
        f"try cpu, cuda, cuda:1 or auto")
    message = one_line_error(lambda: device_from_flag("cuda:99"))
    assert message.startswith("--device cuda:99: not usable here (") and "None" not in message


def test_load_model_names_the_checkpoint(tmp_path: Path, vae_dir: Path) -> None:
    assert load_model(DiscreteVAE, vae_dir).num_tokens == 16
    assert one_line_error(lambda: load_model(DiscreteVAE, tmp_path)).startswith(f"checkpoint {tmp_path}: ")


def test_fit_runs_the_loop_with_the_flags_and_says_how_it_ended(
        tmp_path: Path, metrics: None, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out = tmp_path / "run"
    args = parse(*SHAPES, "--output-dir", str(out), "--learning-rate", "0.03", "--weight-decay", "0.1",
                 "--lr-schedule", "cosine", "--warmup-steps", "2", "--lr-decay-rate", "0.9", "--epochs", "3",
                 "--ga-steps", "2")
    run = prepare_run(args, FIXED)
    run.resume_state = {"step": 1}
    task = SimpleNamespace(model=torch.nn.Linear(2, 3))
    batches = SimpleNamespace(batches_per_epoch=10)
    calls: list[tuple[Any, ...]] = []
    endings = iter([Outcome(step=15, checkpoint=out / "step-15", last_loss=0.123456),
                    Outcome(step=4, checkpoint=out / "step-4", interrupted_by=15),
                    Outcome(step=0, checkpoint=None, interrupted_by=2, last_loss=None)])

    def train(task: Any, batches: Any, optimizer: Any, schedule: Any, settings: Any, out: Path, metrics: Any,
              config: Any, resume_state: Any) -> Outcome:
        calls.append((task, batches, optimizer, schedule, settings, out, metrics, config, resume_state))
        return next(endings)

    monkeypatch.setattr(common, "train", train)
    capsys.readouterr()
    assert common.fit(task, batches, args, run) == 0
    assert capsys.readouterr().out == f"done: step 15, loss 0.1235; checkpoint {out / 'step-15'}\n"
    assert run.metrics.closed
    got_task, got_batches, optimizer, schedule, *rest = calls[0]
    assert got_task is task and got_batches is batches
    assert rest == [run.settings, run.out, run.metrics, run.config, run.resume_state]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups] == [
        (0.03, 0.1, 1), (0.03, 0.0, 1)]
    assert schedule.optimizer is optimizer and schedule.schedule == "cosine"
    assert (schedule.total, schedule.warmup, schedule.decay_rate) == (15, 2, 0.9)  # 3 epochs of 10 / 2

    assert common.fit(task, batches, args, run) == 128 + 15
    assert capsys.readouterr().out == (f"stopped by signal 15 at step 4; checkpoint {out / 'step-4'}; "
                                       f"continue with: --resume --output-dir {out}\n")
    assert common.fit(task, batches, args, run) == 128 + 2
    assert capsys.readouterr().out == (f"stopped by signal 2 at step 0; no checkpoint; "
                                       f"continue with: --resume --output-dir {out}\n")

    def failing(*args: Any) -> Outcome:
        raise RuntimeError("boom")

    monkeypatch.setattr(common, "train", failing)
    run.metrics.closed = False
    with pytest.raises(RuntimeError, match="boom"):
        common.fit(task, batches, args, run)
    assert run.metrics.closed
