"""Where a run keeps its checkpoints, and how a path given by the user finds a model in them.

::

    OUT/checkpoints/step-120/          a model directory: config.json + model.safetensors
                                        (+ vae/ and tokenizer/ for a DALLE), loadable with
                                        from_pretrained, plus training/ (optimizer, scheduler,
                                        RNG and data position, for --resume), and
                                        engine/ when the backend keeps its own state
                                        (DeepSpeed's sharded checkpoint)
    OUT/checkpoints/latest             a text file naming the newest complete step directory

A step directory is written under a temporary name and renamed when complete, and ``latest``
is replaced atomically after that, so a half-written checkpoint is never picked up.
"""

from __future__ import annotations

from pathlib import Path

from dalle_core.plugins import VAE_RECORD
from dalle_core.pretrained import CONFIG_NAME
from dalle_train.errors import TrainError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STEP_PREFIX = "step-"
TRAINING_STATE = "training"
#: the distributed engine's own files for an exact resume (`DistributedBackend.save_engine_state`)
ENGINE_STATE = "engine"


def step_dir(checkpoints: Path, step: int) -> Path:
    """``checkpoints/step-<step>``."""
    return checkpoints / f"{STEP_PREFIX}{step}"


def latest_step_dir(checkpoints: Path) -> Path | None:
    """The step directory ``checkpoints/latest`` names, or None when there is none yet."""
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return None
    target = checkpoints / pointer.read_text().strip()
    if not (target / CONFIG_NAME).is_file():
        raise TrainError(
            f"{pointer} names {target.name}, which is not a complete checkpoint "
            f"({CONFIG_NAME} is missing); point it at another step-N directory or delete it"
        )
    return target


def find_model_dir(path: str | Path) -> Path:
    """The model directory for a path a user gave: a model directory itself, a run's output
    directory or its ``checkpoints/`` folder (their newest checkpoint)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file() or (path / VAE_RECORD).is_file():  # a VAE may keep its own files
        return path
    for checkpoints in (path / CHECKPOINTS, path):
        if (checkpoints / LATEST).is_file():
            found = latest_step_dir(checkpoints)
            if found is not None:
                return found
    if not path.exists():
        raise TrainError(f"{path} does not exist: give a checkpoint directory (with {CONFIG_NAME})")
    raise TrainError(
        f"{path} holds no model: expected {CONFIG_NAME} (a checkpoint directory such as "
        f"OUT/checkpoints/step-N) or a run directory with {CHECKPOINTS}/{LATEST}"
    )
