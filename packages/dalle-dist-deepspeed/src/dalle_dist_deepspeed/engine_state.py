"""DeepSpeed's own checkpoint of a run (``engine/`` inside a step directory), for exact resumes.

``engine.save_checkpoint`` writes each process's ZeRO partitions (weights in fp32, the
optimizer's moments) under ``engine/zero/``; beside it ``dalle_engine.json`` (the manifest)
records what can read it back: the same ZeRO stage, number of processes, precision and
optimizer offload; and the fp16 loss scale, which DeepSpeed's files do not hold under
``torch_autocast``. Anything else resumes from the ordinary checkpoint instead.

The files are read with ``torch.load(weights_only=True)`` (DeepSpeed itself unpickles them):
only tensors, plain containers and the few DeepSpeed classes in `SAFE_GLOBALS` are accepted.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

#: DeepSpeed's name for the one checkpoint in ``engine/``
TAG = "zero"
MANIFEST = "dalle_engine.json"
FORMAT = 1
#: what must match for DeepSpeed's files to be read back
MATCHING = ("zero_stage", "world_size", "precision", "offload")
#: the classes DeepSpeed's files hold besides tensors and containers
SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def manifest(zero_stage: int, world_size: int, precision: str, offload: bool) -> dict[str, Any]:
    """What `save` records beside DeepSpeed's files."""
    import deepspeed

    return {
        "format": FORMAT,
        "zero_stage": zero_stage,
        "world_size": world_size,
        "precision": precision,
        "offload": offload,
        "deepspeed": deepspeed.__version__,
    }


def save(engine: Any, directory: Path, description: dict[str, Any], is_root: bool) -> None:
    """Collective: DeepSpeed's checkpoint under ``directory``, then (root) the manifest, which
    also carries the fp16 loss scaler's state (DeepSpeed's files leave it out)."""
    engine.save_checkpoint(str(directory), tag=TAG)
    scaler = _grad_scaler(engine)
    description = {**description, "grad_scaler": scaler.state_dict() if scaler is not None else None}
    if is_root:
        path = directory / MANIFEST
        temp = path.with_name(f".{MANIFEST}.tmp")
        with open(temp, "w") as handle:
            json.dump(description, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)


def why_not_readable(directory: Path, wanted: dict[str, Any]) -> str | None:
    """None when ``directory`` holds an engine checkpoint this run can read exactly, else the
    reason (for the log)."""
    path = directory / MANIFEST
    if not path.is_file() or not (directory / TAG).is_dir():
        return f"{directory} holds no DeepSpeed checkpoint"
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"{path} is unreadable ({error})"
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        return f"{path} is not a manifest this version writes"
    differing = [
        f"{key} {found.get(key)!r} (now {wanted[key]!r})" for key in MATCHING if found.get(key) != wanted[key]
    ]
    if differing:
        return f"DeepSpeed's checkpoint was written with {', '.join(differing)}"
    return None


def load(engine: Any, directory: Path) -> None:
    """Collective: restore weights, optimizer partitions and loss scaler from ``directory``."""
    with weights_only_loading(engine):
        path, _ = engine.load_checkpoint(
            str(directory),
            tag=TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load its checkpoint from {directory / TAG}")
    scaler, saved = _grad_scaler(engine), json.loads((directory / MANIFEST).read_text()).get("grad_scaler")
    if scaler is not None and saved:
        scaler.load_state_dict(saved)


def _grad_scaler(engine: Any) -> torch.amp.GradScaler | None:
    """The loss scaler ZeRO keeps for fp16 under ``torch_autocast`` (None otherwise)."""
    return getattr(engine.optimizer, "torch_autocast_gradscaler", None)


@contextlib.contextmanager
def weights_only_loading(engine: Any) -> Iterator[None]:
    """Within: the engine reads its files with ``torch.load(weights_only=True)``, allowing
    `SAFE_GLOBALS` only."""
    checkpoint_engine = engine.checkpoint_engine
    allowed = [_resolve(name) for name in SAFE_GLOBALS]
    allowed = [cls for cls in allowed if cls is not None]

    def load_weights_only(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load_weights_only
    try:
        yield
    finally:
        del checkpoint_engine.load  # the class's own method again


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
