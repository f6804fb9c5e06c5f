"""What the three training commands share: run, data and training flags, and run set-up
(device, output directory, resume with its flag check, metrics, the training loop's settings).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dalle_train.choices import as_train_error
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag
from dalle_train.training.checkpoints import load_state, resume_dir
from dalle_train.training.layout import CHECKPOINTS, latest_step_dir
from dalle_train.training.loop import LoopSettings, Task, train
from dalle_train.training.metrics import MetricsLog
from dalle_train.training.optim import SCHEDULES, Schedule, build_optimizer
from dalle_train.training.precision import PRECISIONS, Precision, precision_from_flags
from dalle_train.training.rng import seed_everything

#: flags that describe where and how this process runs, never saved with a run
NOT_SAVED = frozenset(
    {"given", "run", "command", "resume", "resume_from", "start_fresh", "output_dir", "device"}
)


def add_run_flags(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Output directory, resume, device, precision, logging."""
    group = parser.add_argument_group("run")
    add_flag(group, "--output-dir", type=Path, default=Path(default_out),
             help=f"where checkpoints, samples and metrics go (default: {default_out})")
    add_flag(group, "--resume", action="store_true",
             help="continue from OUT/checkpoints/latest exactly (model, optimizer, data position, RNG)")
    add_flag(group, "--start-fresh", action="store_true",
             help="delete OUT/checkpoints and start again, whatever it holds")
    add_flag(group, "--seed", type=int, default=0, help="seed of data order, augmentation, init (default 0)")
    add_flag(group, "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_flag(group, "--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_flag(group, "--precision", choices=PRECISIONS, help="fp32 (default), bf16, or fp16 with loss scaling")
    add_flag(group, "--fp16", action="store_true", help="upstream spelling of --precision fp16")
    add_flag(group, "--amp", action="store_true", help="upstream spelling of --precision fp16")
    add_flag(group, "--compile", action="store_true", help="torch.compile the model")
    add_flag(group, "--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    add_flag(group, "--wandb", action="store_true",
             help="also log to Weights & Biases (offline without an API key)")
    add_flag(group, "--wandb-name", help="W&B project name (implies --wandb)")
    add_flag(group, "--wandb-entity", help="W&B entity (team or user)")
    add_flag(group, "--log-every", type=int, default=10, help="steps between metric records (default 10)")
    add_flag(group, "--sample-every", type=int, default=100,
             help="steps between sample pictures under OUT/samples (0: only at the end; default 100)")


def add_training_flags(parser: argparse.ArgumentParser, *, batch_size: int, learning_rate: float,
                       clip_grad_norm: float | None, schedule: str) -> None:
    """Epochs, steps, batch, optimizer and checkpoints, with the upstream spellings."""
    group = parser.add_argument_group("training")
    add_flag(group, "--epochs", type=int, default=20, help="passes over the data (default 20)")
    add_flag(group, "--max-steps", type=int,
             help="stop after this many optimizer steps, whatever --epochs says")
    add_flag(group, "--batch-size", type=int, default=batch_size,
             help=f"samples per micro-batch (default {batch_size})")
    add_flag(group, "--ga-steps", type=int, default=1, help="micro-batches accumulated per optimizer step")
    add_flag(group, "--learning-rate", type=float, default=learning_rate,
             help=f"peak rate (default {learning_rate})")
    add_flag(group, "--weight-decay", type=float, default=0.0, help="AdamW decay of matrices (default 0)")
    add_flag(group, "--clip-grad-norm", type=float, default=clip_grad_norm,
             help=f"clip gradients to this norm (default {clip_grad_norm}; 0 turns it off)")
    add_flag(group, "--lr-schedule", choices=SCHEDULES, default=schedule, help=f"(default {schedule})")
    add_flag(group, "--lr-decay", action="store_true", help="upstream spelling of --lr-schedule plateau")
    add_flag(group, "--lr-decay-rate", type=float, default=0.98,
             help="factor per 100 steps of --lr-schedule exponential (default 0.98)")
    add_flag(group, "--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    add_flag(group, "--save-every-n-steps", type=int, default=1000, help="checkpoint interval (default 1000)")
    add_flag(group, "--keep-n-checkpoints", type=int, help="keep only the newest N checkpoints")
    add_flag(group, "--num-workers", type=int, default=0, help="data loader worker processes (default 0)")


def add_data_flags(parser: argparse.ArgumentParser, *, folder_flag: str, captions: bool) -> None:
    """The data source: a folder (``--image-folder`` / ``--image-text-folder``) or a built-in set."""
    group = parser.add_argument_group("data")
    add_flag(group, folder_flag, type=Path,
             help="images paired with .txt captions of the same name, nested at any depth"
             if captions else "images, flat or nested (no class subfolders needed)")
    add_flag(group, "--dataset", choices=("shapes",), help="a built-in dataset instead of a folder")
    add_flag(group, "--dataset-size", type=int, default=4000, help="pictures of --dataset shapes")
    add_flag(group, "--transparent", action="store_true", help="RGBA images (4 channels)")
    if captions:
        add_flag(group, "--random-resize-crop-lower-ratio", type=float, default=0.75,
                 help="smallest area fraction of the random square crop (default 0.75)")
        add_flag(group, "--truncate-captions", action="store_true",
                 help="cut captions longer than --text-seq-len instead of stopping")


def device_from_flag(flag: str) -> torch.device:
    """``--device``: ``auto`` is cuda when available, else cpu; a name that is not a device, or
    a device this machine lacks, is a `TrainError`."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise TrainError(
            f"--device {flag}: not usable here ({str(error).splitlines()[0]}); try cpu, cuda, cuda:1 or auto"
        ) from error
    return device


@dataclass
class Run:
    """A prepared run: where it writes, what it resumes, how the loop behaves."""

    out: Path
    device: torch.device
    settings: LoopSettings
    metrics: MetricsLog
    config: dict[str, Any]
    #: the checkpoint directory and its training state, when resuming
    resume_from: Path | None = None
    resume_state: dict[str, Any] | None = None


def load_model(cls: Any, directory: Path) -> Any:
    """``cls.from_pretrained(directory)``; a checkpoint that cannot be read (missing, foreign or
    unsafe files) is a `TrainError` naming it."""
    return as_train_error(f"checkpoint {directory}", lambda: cls.from_pretrained(directory))


def saved_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that define a run, as JSON values (saved with every checkpoint)."""
    values = {}
    for key, value in vars(args).items():
        if key in NOT_SAVED:
            continue
        values[key] = str(value) if isinstance(value, Path) else value
    json.dumps(values)  # every flag is a JSON value
    return values


def merge_resumed_flags(args: argparse.Namespace, saved: dict[str, Any], fixed: frozenset[str]) -> None:
    """Take every flag the user did not give from the checkpoint; refuse a given flag in
    ``fixed`` (what shapes the model, VAE or tokenizer) that differs from it."""
    differences = []
    for key, value in saved.items():
        current = getattr(args, key, None)
        current = str(current) if isinstance(current, Path) else current
        if key not in args.given:
            setattr(args, key, Path(value) if isinstance(getattr(args, key, None), Path) else value)
        elif key in fixed and current != value:
            differences.append(f"--{key.replace('_', '-')} {current} (checkpoint: {value})")
    if differences:
        raise TrainError(
            "these flags differ from the checkpoint being resumed: " + "; ".join(differences)
            + ". Drop them to keep the checkpoint's values, or pass --start-fresh to begin a new run"
        )


def prepare_run(args: argparse.Namespace, fixed: frozenset[str]) -> Run:
    """Resolve resume (merging flags), seed, device and precision; open the metrics log."""
    out: Path = args.output_dir
    checkpoints = out / CHECKPOINTS
    resume_from = resume_state = None
    if args.start_fresh and (args.resume or getattr(args, "resume_from", None)):
        raise TrainError("--resume and --start-fresh contradict each other: pick one")
    if args.start_fresh and checkpoints.exists():
        shutil.rmtree(checkpoints)
        print(f"--start-fresh: removed {checkpoints}")
    elif args.resume or getattr(args, "resume_from", None):
        resume_from = getattr(args, "resume_from", None) or resume_dir(checkpoints)
        resume_state = load_state(resume_from)
        merge_resumed_flags(args, resume_state["run"]["flags"], fixed)
    else:
        latest = latest_step_dir(checkpoints) if checkpoints.is_dir() else None
        if latest is not None:
            raise TrainError(
                f"{checkpoints} already holds checkpoints (latest: {latest.name}): pass --resume to "
                f"continue that run, --start-fresh to replace it, or another --output-dir"
            )
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = device_from_flag(args.device)
    precision = Precision(precision_from_flags(args.precision, args.fp16, args.amp), device)
    if args.lr_decay:
        args.lr_schedule = "plateau"
    for flag in ("batch_size", "ga_steps", "epochs", "save_every_n_steps", "log_every"):
        if getattr(args, flag) < 1:
            raise TrainError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise TrainError(f"--max-steps must be at least 1, got {args.max_steps}")
    settings = LoopSettings(
        precision=precision, epochs=args.epochs, max_steps=args.max_steps, ga_steps=args.ga_steps,
        clip_grad_norm=args.clip_grad_norm or None, save_every=args.save_every_n_steps,
        keep=args.keep_n_checkpoints, log_every=args.log_every, sample_every=args.sample_every,
    )
    config = saved_flags(args)
    metrics = MetricsLog(
        out, tensorboard=args.tensorboard,
        wandb_project=args.wandb_name or ("dalle-train" if args.wandb else None),
        wandb_entity=args.wandb_entity, config=config,
    )
    return Run(out, device, settings, metrics, {"flags": config}, resume_from, resume_state)


def fit(task: Task, batches: Any, args: argparse.Namespace, run: Run) -> int:
    """Optimizer, schedule, the training loop, and the closing line; returns the exit code
    (0, or 128 + the signal after SIGINT/SIGTERM, with a checkpoint saved)."""
    optimizer = build_optimizer(task.model, args.learning_rate, args.weight_decay)
    schedule = Schedule(optimizer, args.lr_schedule, run.settings.total_steps(batches.batches_per_epoch),
                        args.warmup_steps, args.lr_decay_rate)
    try:
        outcome = train(task, batches, optimizer, schedule, run.settings, run.out, run.metrics,
                        run.config, run.resume_state)
    finally:
        run.metrics.close()
    where = f"checkpoint {outcome.checkpoint}" if outcome.checkpoint else "no checkpoint"
    if outcome.interrupted_by is not None:
        print(f"stopped by signal {outcome.interrupted_by} at step {outcome.step}; {where}; "
              f"continue with: --resume --output-dir {run.out}")
        return 128 + outcome.interrupted_by
    print(f"done: step {outcome.step}, loss {outcome.last_loss:.4f}; {where}")
    return 0
