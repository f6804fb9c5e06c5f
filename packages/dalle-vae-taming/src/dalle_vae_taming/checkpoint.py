"""Reading the weights out of a PyTorch Lightning checkpoint without running pickled code.

A Lightning ``.ckpt`` is a ``torch.save`` of a dict: ``state_dict`` (the weights) beside
``epoch``, ``global_step``, optimizer states and ``callbacks`` (old Lightning versions key it
by callback *classes*; hyper-parameters may hold ``AttributeDict``/OmegaConf objects). A plain
``torch.load(weights_only=True)`` refuses those globals, and ``weights_only=False`` would run
whatever the file names. Here the file is loaded with ``weights_only=True`` after binding every
global that torch does not allow to an inert stand-in class defined in this module (an empty
subclass of `SkippedObject`): the unpickler never imports or calls anything the file names,
tensors are rebuilt by torch's own allow-listed functions, and only ``state_dict`` is kept.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class SkippedObject:
    """Stands in for a pickled object of a class that is not loaded; takes and keeps nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> SkippedObject:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def stand_ins(path: Path) -> list[tuple[type, str]]:
    """``(stand-in class, global name)`` for each global in ``path`` that torch does not allow.

    Only zip checkpoints (``torch.save`` since PyTorch 1.6, so every Lightning checkpoint) can
    be listed; a legacy-format file gets none and loads only if it needs none.
    """
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, zipfile.BadZipFile):
        return []
    return [
        (type(name.rsplit(".", 1)[-1], (SkippedObject,), {"__module__": __name__, "skipped": name}), name)
        for name in sorted(unsafe)
    ]


def require_torch_file(path: Path, label: str) -> None:
    """Raise ValueError (``label`` names the file) unless ``path`` starts like a ``torch.save``
    file: a zip archive (PyTorch >= 1.6) or a legacy pickle. Catches HTML error pages and
    files passed in the wrong argument before torch reads them."""
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as handle:
        start = handle.read(16)
    if start[:1] != b"\x80":
        raise ValueError(
            f"{label} is not a VQGAN checkpoint: it is not a PyTorch file (torch.save writes a zip "
            f"archive; this starts with {start!r})"
        )


def load_lightning_state_dict(path: Path) -> dict[str, Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, loaded safely (see the module docstring).

    Raises ValueError naming ``path`` when it is not a PyTorch checkpoint or holds no
    ``state_dict`` of tensors.
    """
    require_torch_file(path, str(path))
    try:
        with torch.serialization.safe_globals(stand_ins(path)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} could not be loaded safely ({_unpickler_reason(error)}): its pickle does more "
            f"than build plain objects, or it is an old non-zip file whose objects cannot be listed. "
            f"If you trust the file, re-save its weights alone: torch.save({{'state_dict': "
            f"torch.load(path, weights_only=False)['state_dict']}}, new_path)"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{path} is not a VQGAN checkpoint: it could not be read as a PyTorch file "
            f"({type(error).__name__}: {(str(error).splitlines() or [''])[0]})"
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        found = (
            sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        )
        raise ValueError(
            f"{path} is not a VQGAN checkpoint: expected a PyTorch Lightning checkpoint, a dict "
            f"with a 'state_dict' entry, found {found}"
        )
    state = checkpoint["state_dict"]
    bad = [key for key, value in state.items() if not isinstance(key, str) or not isinstance(value, Tensor)]
    if bad:
        raise ValueError(f"{path}: state_dict entries {bad[:5]} are not named tensors")
    return state


def load_into(model: nn.Module, state: dict[str, Tensor], path: Path, config: str, skip_prefix: str) -> None:
    """Load ``state`` into ``model`` strictly (keys under ``skip_prefix`` ignored).

    Missing or unexpected keys or wrong shapes are a ValueError naming the checkpoint ``path``
    and the ``config`` it was checked against.
    """
    state = {key: value for key, value in state.items() if not key.startswith(skip_prefix)}
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [
        f"{key} {list(state[key].shape)} (config: {list(expected[key].shape)})"
        for key in sorted(expected.keys() & state.keys())
        if state[key].shape != expected[key].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} does not hold the VQGAN described by {config}: "
            f"{len(missing)} missing keys {_some(missing)}, {len(unexpected)} unexpected keys "
            f"{_some(unexpected)}, {len(wrong_shape)} with other shapes {_some(wrong_shape)}; "
            f"pass the config the checkpoint was trained with"
        )
    model.load_state_dict(state)


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only error that says what was refused."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". Please use")[0] if lines else type(error).__name__


def _some(items: list[str], limit: int = 5) -> str:
    return "[" + ", ".join(items[:limit]) + (", ...]" if len(items) > limit else "]")
