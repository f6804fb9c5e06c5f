"""What the three training commands share: run, data and training flags, and run set-up
(device, output directory, resume with its configuration check, metrics, the training loop's
settings) from the command's typed configuration (`dalle_train.config`).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from dalle_core.interfaces import DistributedBackend
from dalle_core.plugins import create_backend
from dalle_train.choices import as_train_error
from dalle_train.config import TrainConfig
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag
from dalle_train.training.checkpoints import load_state, resume_dir
from dalle_train.training.layout import CHECKPOINTS, latest_step_dir
from dalle_train.training.loop import LoopSettings, Task, train
from dalle_train.training.metrics import MetricsLog, SilentMetrics
from dalle_train.training.optim import SCHEDULES, Schedule, build_optimizer
from dalle_train.training.precision import PRECISIONS, Precision
from dalle_train.training.rng import seed_everything

#: where a checkpoint's training state keeps the run's configuration (`TrainConfig.saved`)
CONFIG_KEY = "config"
#: where runs written before the configuration was typed kept their flat flags
OLD_FLAGS_KEY = "flags"


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
    add_flag(group, "--distributed-backend", "--distr_backend", default="none",
             metavar="NAME", help="train in several processes: ddp or fsdp (under torchrun), or a backend a "
             "plugin adds (see dalle-train plugins; default none: one process)")
    add_flag(group, "--deepspeed", action="store_true",
             help="upstream spelling of --distributed-backend deepspeed")
    add_flag(group, "--zero-stage", type=int, choices=(1, 2, 3), metavar="N",
             help="deepspeed: ZeRO stage 1, 2 or 3; when not given, the --deepspeed-config file's, else 1")
    add_flag(group, "--offload", action="store_true", help="deepspeed: keep the optimizer's state on the CPU")
    add_flag(group, "--deepspeed-config", type=Path, metavar="FILE.json",
             help="deepspeed: a configuration merged with what the flags say (a conflict is an error)")
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


def add_wds_flags(group: Any, wds_help: str) -> None:
    """``--wds IMAGE_KEY,CAPTION_KEY`` (what it does here: ``wds_help``) and ``--wds-caption-field``."""
    add_flag(group, "--wds", metavar="IMAGE_KEY,CAPTION_KEY", help=wds_help)
    add_flag(group, "--wds-caption-field", default="caption",
             help="the JSON field a --wds ...,json caption is read from (default caption)")


def documented_parser(subparsers: Any, name: str, summary: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (``summary`` in ``dalle-train --help``): its
    description is the first paragraph of ``doc`` (its module's docstring), its epilog the
    rest, as written."""
    assert doc is not None
    description, epilog = doc.split("\n\n", 1)
    return subparsers.add_parser(name, help=summary, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def add_data_flags(parser: argparse.ArgumentParser, *, folder_flag: str, captions: bool) -> None:
    """The data source: a folder (``--image-folder`` / ``--image-text-folder``) or a built-in set."""
    group = parser.add_argument_group("data")
    if captions:
        add_flag(group, folder_flag,
                 help="images paired with .txt captions of the same name, nested at any depth; with --wds, "
                      "WebDataset shards: a .tar or .tar.gz, a folder of them, a brace-expanded list "
                      "(/data/shard-{0000..0099}.tar, http://host/shard-{000..099}.tar) or a pipe: command")
    else:
        add_flag(group, folder_flag, type=Path, help="images, flat or nested (no class subfolders needed)")
    add_flag(group, "--dataset", choices=("shapes",), help="a built-in dataset instead of a folder")
    add_flag(group, "--dataset-size", type=int, default=4000, help="pictures of --dataset shapes")
    add_flag(group, "--transparent", action="store_true", help="RGBA images (4 channels)")
    if captions:
        add_flag(group, "--random-resize-crop-lower-ratio", type=float, default=0.75,
                 help="smallest area fraction of the random square crop (default 0.75)")
        add_flag(group, "--truncate-captions", action="store_true",
                 help="cut captions longer than --text-seq-len instead of stopping")
        add_wds_flags(group, "read --image-text-folder as WebDataset shards whose samples hold these files "
                             "(--wds jpg,txt; jpg;png takes either; a json caption is read from "
                             "--wds-caption-field)")
        add_flag(group, "--resample-shards", action="store_true",
                 help="draw the shards with replacement, for many nodes (needs --max-steps)")
        add_flag(group, "--tokens", metavar="DIR",
                 help="dalle: train from the shards of dalle-train encode (image codes of the model's VAE) "
                      "instead of images")


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
    """A prepared run: its configuration (merged with the checkpoint's when resuming), where it
    writes, what it resumes, how the loop behaves."""

    config: Any  # the command's TrainConfig
    device: torch.device
    settings: LoopSettings
    metrics: MetricsLog
    #: the initialized distributed backend (``none``: one process)
    backend: DistributedBackend
    #: the checkpoint directory and its training state, when resuming
    resume_from: Path | None = None
    resume_state: dict[str, Any] | None = None

    @property
    def out(self) -> Path:
        return self.config.launch.output_dir

    def saved(self) -> dict[str, Any]:
        """What every checkpoint stores about the run: its configuration's sections."""
        return {CONFIG_KEY: self.config.saved()}


def load_model(cls: Any, directory: Path) -> Any:
    """``cls.from_pretrained(directory)``; a checkpoint that cannot be read (missing, foreign or
    unsafe files) is a `TrainError` naming it."""
    return as_train_error(f"checkpoint {directory}", lambda: cls.from_pretrained(directory))


def saved_sections(config: TrainConfig, run_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The configuration a checkpoint's run was saved with (the flat flags of runs written
    before the configuration was typed are read as the command line would be)."""
    if CONFIG_KEY in run_state:
        return run_state[CONFIG_KEY]
    return config.sections_of_flags(run_state[OLD_FLAGS_KEY])


C = TypeVar("C", bound=TrainConfig)


def start_backend(name: str, **options: Any) -> DistributedBackend:
    """The distributed backend ``--distributed-backend NAME`` names, built with ``options``
    (its engine flags) and initialized (joined)."""
    backend = as_train_error(f"--distributed-backend {name}", lambda: create_backend(name, **options))
    try:
        backend.initialize()
    except (RuntimeError, ValueError, OSError, ImportError) as error:
        raise TrainError(f"--distributed-backend {name}: {error}") from error
    return backend


def prepare_run(config: C) -> Run:
    """Join the distributed backend; resolve resume (merging the configuration with the
    checkpoint's), seed (plus the rank), device and precision; open the metrics log (root)."""
    launch = config.launch
    checkpoints = launch.output_dir / CHECKPOINTS
    resume_from = resume_state = None
    if launch.start_fresh and (launch.resume or launch.resume_from):
        raise TrainError("--resume and --start-fresh contradict each other: pick one")
    backend = start_backend(config.distributed.backend, **config.distributed.backend_options())
    if launch.start_fresh and checkpoints.exists():
        if backend.is_root:
            shutil.rmtree(checkpoints)
            print(f"--start-fresh: removed {checkpoints}")
        backend.barrier()
    elif launch.resume or launch.resume_from:
        resume_from = launch.resume_from or resume_dir(checkpoints)
        resume_state = load_state(resume_from)
        config = config.resumed(saved_sections(config, resume_state["run"]))
    else:
        latest = latest_step_dir(checkpoints) if checkpoints.is_dir() else None
        if latest is not None:
            raise TrainError(
                f"{checkpoints} already holds checkpoints (latest: {latest.name}): pass --resume to "
                f"continue that run, --start-fresh to replace it, or another --output-dir"
            )
    if launch.threads:
        torch.set_num_threads(launch.threads)
    optim, logging = config.optim, config.logging
    seed_everything(optim.seed + backend.rank)  # each process its own dropout; rank 0 as one process
    device = backend.device(device_from_flag(launch.device))
    counts = {"batch_size": optim.batch_size, "ga_steps": optim.ga_steps, "epochs": optim.epochs,
              "save_every_n_steps": config.checkpoints.save_every_n_steps, "log_every": logging.log_every}
    for flag, count in counts.items():
        if count < 1:
            raise TrainError(f"--{flag.replace('_', '-')} must be at least 1, got {count}")
    if optim.max_steps is not None and optim.max_steps < 1:
        raise TrainError(f"--max-steps must be at least 1, got {optim.max_steps}")
    settings = LoopSettings(
        precision=Precision(optim.precision, device), batch_size=optim.batch_size, epochs=optim.epochs,
        max_steps=optim.max_steps,
        ga_steps=optim.ga_steps, clip_grad_norm=optim.clip_grad_norm,
        save_every=config.checkpoints.save_every_n_steps, keep=config.checkpoints.keep_n_checkpoints,
        log_every=logging.log_every, sample_every=logging.sample_every,
    )
    metrics = SilentMetrics()
    if backend.is_root:
        metrics = MetricsLog(launch.output_dir, tensorboard=logging.tensorboard,
                             wandb_project=logging.wandb_project, wandb_entity=logging.wandb_entity,
                             config=config.saved())
    if backend.world_size > 1 and backend.is_root:
        per_step = backend.world_size * optim.batch_size * optim.ga_steps
        print(f"distributed: {config.distributed.backend}, {backend.world_size} processes x --batch-size "
              f"{optim.batch_size} x --ga-steps {optim.ga_steps} = {per_step} samples per optimizer step; "
              f"--learning-rate {optim.learning_rate} is used as given (not scaled with the processes)")
    return Run(config, device, settings, metrics, backend, resume_from, resume_state)


def fit(task: Task, batches: Any, run: Run) -> int:
    """Optimizer, schedule, the training loop, and the closing line; returns the exit code
    (0, or 128 + the signal after SIGINT/SIGTERM, with a checkpoint saved)."""
    optim = run.config.optim
    optimizer = build_optimizer(task.model, optim.learning_rate, optim.weight_decay)
    schedule = Schedule(optimizer, optim.lr_schedule, run.settings.total_steps(batches.batches_per_epoch),
                        optim.warmup_steps, optim.lr_decay_rate)
    root = run.backend.is_root
    try:
        outcome = train(task, batches, optimizer, schedule, run.settings, run.out, run.metrics,
                        run.saved(), run.resume_state, run.backend, run.resume_from)
    finally:
        run.metrics.close()
        run.backend.shutdown()
    where = f"checkpoint {outcome.checkpoint}" if outcome.checkpoint else "no checkpoint"
    if outcome.interrupted_by is None:
        code, line = 0, f"done: step {outcome.step}, loss {outcome.last_loss:.4f}; {where}"
    else:
        code = 128 + outcome.interrupted_by
        line = (f"stopped by signal {outcome.interrupted_by} at step {outcome.step}; {where}; "
                f"continue with: --resume --output-dir {run.out}")
    if root:  # the root says how the run ended
        print(line)
    return code
