"""The training loop shared by the VAE, DALLE and CLIP commands.

A `Task` says what one micro-batch's loss is and what pictures to write; `train` does the rest:
gradient accumulation, mixed precision, clipping, the learning-rate schedule, the progress bar,
metrics, sample pictures, atomic checkpoints, exact resumes, SIGINT/SIGTERM and NaN losses.

It is one loop for every distributed backend (`dalle_core.interfaces.DistributedBackend`): the
backend wraps the model, runs backward and the optimizer step, and keeps the processes in step
(averaged losses, one decision to stop); only the root process writes metrics, pictures and
checkpoints, and each process's random generators are saved with them. Every save is
collective: the optimizer's state and the weights are gathered (an engine that shards them
gathers them for the root), and an engine with its own state (DeepSpeed) writes it beside the
ordinary checkpoint, which stays loadable by any backend and by generation.

The loop synchronises with the device only at logging and saving steps: losses accumulate in a
device tensor and are read (and checked for NaN) every ``log_every`` steps and before every
save, so a checkpoint always holds weights whose loss was finite.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dalle_core.backends import SingleProcessBackend
from dalle_core.interfaces import DistributedBackend, StepPlan
from dalle_train.choices import as_train_error
from dalle_train.data.report import KINDS, SkipReport
from dalle_train.errors import TrainError
from dalle_train.training.checkpoints import new_staging_dir, remove_partial, save_checkpoint, staging_dir
from dalle_train.training.layout import CHECKPOINTS, ENGINE_STATE, step_dir
from dalle_train.training.metrics import MetricsLog
from dalle_train.training.optim import Schedule
from dalle_train.training.precision import Precision
from dalle_train.training.reload_check import FirstCheckpointCheck
from dalle_train.training.rng import rng_state, seed_everything, set_rng_state
from dalle_train.training.signals import StopRequest


class Task(ABC):
    """One model's training: the loss of a micro-batch and the pictures worth looking at."""

    #: shown in the progress bar and the metrics
    name: str = "model"
    #: the module being trained (saved with ``save_pretrained`` at every checkpoint)
    model: nn.Module
    #: tokens one sample contributes (for tokens/s); 0 when not meaningful
    tokens_per_sample: int = 0
    #: the model as the backend wrapped it for training (set by `train`); None: ``model``
    wrapped: nn.Module | None = None

    @property
    def net(self) -> nn.Module:
        """What `loss` runs: the wrapped model while training, else the model."""
        return self.wrapped if self.wrapped is not None else self.model

    @abstractmethod
    def loss(self, batch: Any, step: int) -> Tensor:
        """Scalar loss of one micro-batch at optimizer step ``step`` (runs under autocast)."""

    def batch_size(self, batch: Any) -> int:
        """Samples in ``batch`` (for samples/s)."""
        return len(batch.images)

    def status(self, step: int) -> dict[str, float]:
        """Extra numbers for the progress bar and metrics at ``step`` (e.g. a temperature)."""
        return {}

    def write_samples(self, step: int, directory: Path) -> dict[str, Path | float]:
        """Write pictures for ``step`` under ``directory``; returns metrics and PNG paths."""
        return {}


#: the training state's list of every process's random generators (runs of several processes)
RNG_BY_RANK = "rng_by_rank"
#: the training state's key for every process's data position (by rank), when they differ
DATA_BY_RANK = "data_by_rank"


@dataclass
class LoopSettings:
    """How long and how to train (the command-line flags the loop needs)."""

    precision: Precision
    #: samples per process per micro-batch (``--batch-size``)
    batch_size: int = 1
    epochs: int = 20
    max_steps: int | None = None
    ga_steps: int = 1
    clip_grad_norm: float | None = None
    save_every: int = 1000
    keep: int | None = None
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end

    def total_steps(self, batches_per_epoch: int | None) -> int:
        """Optimizer steps the run makes: ``--max-steps``, else ``--epochs`` worth of batches
        (data of unknown size, None, needs ``--max-steps``)."""
        if self.max_steps is not None:
            return self.max_steps
        if batches_per_epoch is None:
            raise TrainError("the data's size is unknown (shards without img2dataset's _stats.json, remote "
                             "or piped, or --resample-shards), so --epochs cannot say when to stop: give "
                             "--max-steps")
        return max(self.epochs * batches_per_epoch // self.ga_steps, 1)

    def plan(self) -> StepPlan:
        """What the distributed backend is told about stepping (`DistributedBackend.wrap`)."""
        return StepPlan(micro_batch_size=self.batch_size, ga_steps=self.ga_steps,
                        clip_grad_norm=self.clip_grad_norm, precision=self.precision.name)


@dataclass
class Outcome:
    """How a run ended."""

    step: int
    checkpoint: Path | None
    interrupted_by: int | None = None
    last_loss: float | None = None


def train(
    task: Task,
    batches: Any,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    settings: LoopSettings,
    out: Path,
    metrics: MetricsLog,
    run_config: dict[str, Any],
    resume: dict[str, Any] | None = None,
    backend: DistributedBackend | None = None,
    resume_dir: Path | None = None,
) -> Outcome:
    """Train ``task.model`` on ``batches`` (an endless, resumable iterator of micro-batches).

    ``resume`` is a saved training state (`dalle_train.training.checkpoints.load_state`) and
    ``resume_dir`` the checkpoint it came from (where an engine's own state may be);
    ``run_config`` is stored with every checkpoint so a resumed run can check its flags;
    ``backend``: the initialized distributed backend (None: one process).
    """
    backend = backend or SingleProcessBackend()
    model, checkpoints, root = task.model, out / CHECKPOINTS, backend.is_root
    if root:
        remove_partial(checkpoints)
    scaler = settings.precision.scaler()
    total = settings.total_steps(batches.batches_per_epoch)
    step = 0
    if resume is not None:
        step = int(resume["step"])
        if step >= total:
            raise TrainError(f"the checkpoint is at step {step} and this run stops at step {total}: "
                             f"raise --max-steps or --epochs to train further")
    device, model_class = next(model.parameters()).device, type(model)  # a backend may change its class
    check_first = FirstCheckpointCheck(model)  # before a backend shards it
    # a backend's configuration (a DeepSpeed file contradicting the flags) is checked here
    task.wrapped, optimizer = as_train_error(f"--distributed-backend {backend.plugin_name}",
                                             lambda: backend.wrap(model, optimizer, settings.plan()))
    schedule.optimizer = optimizer  # a backend may return another optimizer (Horovod's, DeepSpeed's)
    if resume is not None:
        _resume_optimizer(resume, resume_dir, backend, optimizer)
        schedule.load_state_dict(resume["schedule"])
        scaler.load_state_dict(resume["scaler"])
        by_rank = resume.get(DATA_BY_RANK)
        same_world = by_rank is not None and len(by_rank) == backend.world_size
        batches.load_state_dict(by_rank[backend.rank] if same_world else resume["data"])
        _resume_rng(resume, backend, step)

    running, micro_batches, samples, last_saved = torch.zeros((), device=device), 0, 0, None
    logged_epoch = batches.epoch  # a line sums up the skipped samples when a log finds it ended
    last_loss, started = None, time.perf_counter()
    items = iter(batches)

    def save(at: int) -> Path:
        # every process's generators, by rank, and (several processes) a fingerprint of its weights
        fingerprint = _fingerprint(model) if backend.world_size > 1 and backend.replicated else None
        gathered = backend.gather_object((rng_state(), fingerprint, batches.state_dict()))
        rngs = [rng for rng, _, _ in gathered]
        data = [position for _, _, position in gathered]  # streamed shards: one per process
        differing = [rank for rank, (_, print_, _) in enumerate(gathered) if print_ != gathered[0][1]]
        if differing:
            raise TrainError(f"at step {at} the weights of process(es) {differing} differ from process "
                             f"0's: the {backend.plugin_name} backend did not keep them in step; nothing "
                             f"was saved")
        optimizer_state = backend.optimizer_state_dict(optimizer)  # collective
        state = {
            "step": at, "optimizer": optimizer_state, "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(), "data": data[0], "rng": rngs[0], "run": run_config,
        }
        if len(rngs) > 1:
            state[RNG_BY_RANK] = rngs
        if any(position != data[0] for position in data):
            state[DATA_BY_RANK] = data
        temp = new_staging_dir(checkpoints, at) if root else staging_dir(checkpoints, at)
        backend.barrier()  # the staging directory exists for every process
        backend.save_engine_state(temp / ENGINE_STATE)
        saved = step_dir(checkpoints, at)
        # the run's first checkpoint is read back before it is published (`check_first_checkpoint`)
        check = None if last_saved else lambda directory: check_first(
            model, lambda path: model_class.from_pretrained(path, map_location=device), directory,
            backend.replicated)
        with backend.gathered(model):
            if root:
                saved = save_checkpoint(checkpoints, at, model, state, settings.keep, temp, check)
        backend.barrier()  # the others wait until the checkpoint is complete
        return saved

    bar = tqdm(total=total, initial=step, desc=task.name, unit="step", dynamic_ncols=True, mininterval=0.5,
               disable=not root)
    with StopRequest() as stop, bar:  # the bar is closed before any error is printed
        while step < total:
            task.wrapped.train()
            lr = schedule.apply(step)
            for index in range(settings.ga_steps):
                batch = next(items)
                with backend.accumulating(task.wrapped, sync=index == settings.ga_steps - 1):
                    with settings.precision.autocast():
                        loss = task.loss(batch, step)
                    backend.backward(loss / settings.ga_steps, scaler)
                running += loss.detach().float()
                micro_batches += 1
                samples += task.batch_size(batch)
            backend.step(optimizer, scaler, settings.clip_grad_norm)
            step += 1
            bar.update(1)

            # read once, agreed by every process: a signal from here on is seen after the next step
            stopping = backend.any(stop.requested)
            saving = step % settings.save_every == 0 or step == total or stopping
            if saving or step % settings.log_every == 0:
                last_loss = float(backend.average(running / micro_batches))  # the only host sync
                if not math.isfinite(last_loss):
                    where = f"the last good checkpoint is {last_saved}" if last_saved else "none was saved"
                    raise TrainError(
                        f"the loss became {last_loss} by step {step}; {where}. Lower --learning-rate, "
                        f"set --clip-grad-norm, or use --precision bf16/fp32", exit_code=3
                    )
                schedule.observe(last_loss)
                seconds = max(time.perf_counter() - started, 1e-9)
                rates = {"samples_per_s": samples * backend.world_size / seconds}
                if task.tokens_per_sample:
                    rates["tokens_per_s"] = samples * backend.world_size * task.tokens_per_sample / seconds
                extra = task.status(step)
                skipped = _skipped(batches, backend)  # collective
                metrics.log(step, {"loss": last_loss, "lr": lr, "epoch": batches.epoch, **extra,
                                   **{k: round(v, 2) for k, v in rates.items()}, **skipped})
                if root and batches.epoch != logged_epoch:
                    what = f"skipped {skipped['skipped']} samples so far" if skipped else "no sample skipped"
                    tqdm.write(f"epoch {logged_epoch} done at step {step}: {what}"
                               + "".join(f", {k[8:]} {v}" for k, v in skipped.items() if k != "skipped"))
                    logged_epoch = batches.epoch
                bar.set_postfix({"loss": f"{last_loss:.4f}", **{k: f"{v:.3g}" for k, v in extra.items()},
                                 "samples/s": f"{rates['samples_per_s']:.1f}"}, refresh=False)
                running.zero_()
                micro_batches = 0
            sampling = (settings.sample_every and step % settings.sample_every == 0) or step == total
            if root and sampling and backend.replicated:
                _write_samples(task, step, out, metrics)
            if saving:
                last_saved = save(step)
                if root and sampling and not backend.replicated:
                    _write_samples_from(model_class.from_pretrained(last_saved, map_location=device), task,
                                        step, out, metrics)
            if stopping:
                return Outcome(step, last_saved, stop.signum, last_loss)
    return Outcome(step, last_saved, None, last_loss)


def _fingerprint(model: nn.Module) -> list[float]:
    """Per parameter, the sum of its values in float64: equal in processes that hold the same
    weights (compared before every save of a distributed run)."""
    return [float(p.detach().sum(dtype=torch.float64)) for p in model.parameters()]


def _resume_rng(resume: dict[str, Any], backend: DistributedBackend, step: int) -> None:
    """Each process's random generators as saved; with another number of processes than the
    run that saved them, the root's, and for each other rank a reseed from (step, rank)."""
    by_rank = resume.get(RNG_BY_RANK) or [resume["rng"]]
    if len(by_rank) == backend.world_size:
        set_rng_state(by_rank[backend.rank])
        return
    set_rng_state(resume["rng"])
    if backend.rank:
        seed_everything(step * 1_000_003 + backend.rank)


def _skipped(batches: Any, backend: DistributedBackend) -> dict[str, int]:
    """Samples every process's data skipped so far: ``skipped`` (all) and ``skipped_<kind>``
    for each kind that occurred; empty for data that skips nothing. A collective call."""
    report = getattr(getattr(batches, "dataset", None), "report", None)
    if not isinstance(report, SkipReport):
        return {}
    counts = torch.tensor([float(report.count(kind)) for kind in KINDS])  # [kinds], this process's
    totals = (backend.average(counts) * backend.world_size).round().long().tolist()  # over all processes
    found = {f"skipped_{kind}": n for kind, n in zip(KINDS, totals) if n}
    return {"skipped": sum(totals), **found} if found else {}


def _resume_optimizer(resume: dict[str, Any], resume_dir: Path | None, backend: DistributedBackend,
                      optimizer: torch.optim.Optimizer) -> None:
    """The engine's own state when it saved one this backend can read (an exact resume), else
    the ordinary checkpoint's optimizer state; a run whose engine kept it only in its own files
    (DeepSpeed's ZeRO) restarts the optimizer's moments, and says so."""
    if resume_dir is not None and backend.load_engine_state(resume_dir / ENGINE_STATE):
        return
    if resume["optimizer"] is not None:
        backend.load_optimizer_state_dict(optimizer, resume["optimizer"])
    elif backend.is_root:
        print(f"{resume_dir or 'the checkpoint'}: the optimizer's state was saved only in its engine's own "
              f"files, which the {backend.plugin_name} backend with {backend.world_size} process(es) cannot "
              f"read; the weights, schedule, data position and random generators resume, the optimizer's "
              f"moments start again")


def _write_samples_from(reloaded: nn.Module, task: Task, step: int, out: Path, metrics: MetricsLog) -> None:
    """Samples of an engine that shards the weights (its forward is collective) come from the
    checkpoint just saved, ``reloaded`` whole into an ordinary model on the root."""
    trained, task.model = task.model, reloaded
    try:
        _write_samples(task, step, out, metrics)
    finally:
        task.model = trained


def _write_samples(task: Task, step: int, out: Path, metrics: MetricsLog) -> None:
    """Pictures from the model in eval mode; the training RNG streams are put back afterwards
    (a model may draw from them, as the VAE's Gumbel sampling does), so writing samples never
    changes a run."""
    saved = rng_state()
    task.model.eval()
    with torch.no_grad():
        written = task.write_samples(step, out / "samples")
    task.model.train()
    set_rng_state(saved)
    numbers = {k: v for k, v in written.items() if isinstance(v, (int, float))}
    if numbers:
        metrics.log(step, numbers)
    for name, value in written.items():
        if isinstance(value, Path):
            metrics.image(step, name, value)

