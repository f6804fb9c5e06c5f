"""Atomic training checkpoints: ``OUT/checkpoints/step-N/`` (see `dalle_train.training.layout`).

A step directory is built under a hidden temporary name (`staging_dir`: the distributed
engine's own files, when it has any, then the model with ``save_pretrained``, then
``training/state.pt``), renamed into place once complete, and only then named by
``latest``. A process killed at any point leaves either the previous checkpoint as ``latest``
or a hidden temporary directory, which the next run deletes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dalle_core.pretrained import CONFIG_NAME, atomic_torch_save, atomic_write_bytes, load_failure
from dalle_train.errors import TrainError
from dalle_train.training.layout import LATEST, STEP_PREFIX, TRAINING_STATE, latest_step_dir, step_dir

STATE_FILE = "state.pt"
TEMP_PREFIX = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(checkpoints: Path) -> list[Path]:
    """Complete step directories, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [
        p for p in checkpoints.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()
        and (p / CONFIG_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def remove_partial(checkpoints: Path) -> list[Path]:
    """Delete what a run killed while saving leaves: temporary step directories and the
    temporary file of ``latest`` (`atomic_write_bytes` names it ``.latest.<random>.tmp``);
    returns them."""
    if not checkpoints.is_dir():
        return []
    partial = [*checkpoints.glob(f"{TEMP_PREFIX}*"), *checkpoints.glob(f".{LATEST}.*.tmp")]
    for path in partial:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return partial


def staging_dir(checkpoints: Path, step: int) -> Path:
    """The hidden temporary directory ``checkpoints/step-<step>`` is built in (one name for
    every process of a run: a distributed engine writes its own files there first)."""
    return checkpoints / f"{TEMP_PREFIX}{step_dir(checkpoints, step).name}"


def new_staging_dir(checkpoints: Path, step: int) -> Path:
    """`staging_dir`, emptied (what a failed save of the same step left is removed)."""
    temp = staging_dir(checkpoints, step)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    return temp


def save_checkpoint(
    checkpoints: Path, step: int, model: Any, state: dict[str, Any], keep: int | None,
    temp: Path | None = None, check: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``checkpoints/step-<step>`` (model + ``training/state.pt``) atomically, point
    ``latest`` at it and keep only the newest ``keep`` step directories (all when None).
    ``temp``: the staging directory already holding the engine's files (`new_staging_dir`).
    ``check(temp)`` runs on the complete staging directory before it is published: when it
    raises, the checkpoint stays unpublished (and ``latest`` unchanged)."""
    final = step_dir(checkpoints, step)
    temp = temp or new_staging_dir(checkpoints, step)
    model.save_pretrained(temp)
    atomic_torch_save(state, temp / TRAINING_STATE / STATE_FILE)
    if check is not None:
        check(temp)
    _fsync_dir(temp)
    if final.exists():  # the same step saved again (a resumed run stopping where it began)
        _remove(final)
    os.replace(temp, final)
    _fsync_dir(checkpoints)
    atomic_write_bytes(checkpoints / LATEST, f"{final.name}\n".encode())
    if keep is not None:
        for old in step_dirs(checkpoints)[: -max(keep, 1)]:
            if old != final:
                _remove(old)
    return final


def _remove(directory: Path) -> None:
    """Delete a step directory, renamed to a temporary name first: a run killed while deleting
    leaves a temporary directory (deleted at the next start), never a half-deleted checkpoint."""
    doomed = directory.with_name(f"{TEMP_PREFIX}deleted-{directory.name}-{os.getpid()}")
    os.replace(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def load_state(directory: Path) -> dict[str, Any]:
    """The training state saved beside a checkpoint's model (tensors and plain data only)."""
    path = directory / TRAINING_STATE / STATE_FILE
    if not path.is_file():
        raise TrainError(
            f"{directory} has no training state ({TRAINING_STATE}/{STATE_FILE}): it is a model, "
            f"not a resumable checkpoint; start a new run from it instead of resuming"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated, foreign or unsafe file: never resume from it
        raise TrainError(f"{path} is not a readable training state ({load_failure(error)}); "
                         f"resume from an older step-N directory or start fresh") from error


def resume_dir(checkpoints: Path) -> Path:
    """The checkpoint to resume from: the one ``latest`` names."""
    found = latest_step_dir(checkpoints)
    if found is None:
        raise TrainError(f"--resume: {checkpoints} holds no checkpoint yet ({LATEST} is missing)")
    return found
