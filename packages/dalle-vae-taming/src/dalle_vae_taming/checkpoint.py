"""Reading the weights out of a PyTorch Lightning checkpoint without running pickled code.

A Lightning ``.ckpt`` is a ``torch.save`` of a dict: ``state_dict`` (the weights) beside
``epoch``, ``global_step``, optimizer states and ``callbacks`` (old Lightning versions key it
by callback *classes*; hyper-parameters may hold ``AttributeDict``/OmegaConf objects). A plain
``torch.load(weights_only=True)`` refuses those globals, and ``weights_only=False`` would run
whatever the file names. Here the file is loaded with ``weights_only=True`` after binding every
global that torch does not allow to an inert stand-in class defined in this module (an empty
subclass of `SkippedObject`): the unpickler never imports or calls anything the file names,
tensors are rebuilt by torch's own allow-listed functions, and only ``state_dict`` is kept.

torch's unpickler adds items (SETITEM(S), APPEND(S)) only to objects whose type is exactly
``dict``/``OrderedDict``/``Counter`` or ``list``. So the pickle's opcodes are first run over
placeholders (`filled_classes`, nothing is built): a class whose objects get items, a dict
subclass such as ``AttributeDict`` or ``defaultdict`` or a list subclass, is bound to a
subclass of `SkippedDict` or `SkippedList` instead, which builds an empty ``OrderedDict`` (that
also takes attributes, BUILD) or ``list``. A list subclass whose objects also carry attributes,
or a dict subclass with ``__slots__``, cannot be rebuilt this way: such a file is refused.
"""

from __future__ import annotations

import pickle
import pickletools
import zipfile
from collections import OrderedDict
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


class SkippedDict(SkippedObject):
    """Stands in for a pickled ``dict`` subclass: builds an empty ``OrderedDict``, the one type
    torch's unpickler gives both items and attributes (the stand-in's objects are never used)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


class SkippedList(SkippedObject):
    """Stands in for a pickled ``list`` subclass: builds an empty ``list``, the one type torch's
    unpickler appends to."""

    def __new__(cls, *args: Any, **kwargs: Any) -> list:  # type: ignore[misc]
        return []


#: the stand-in base for a class whose objects the pickle gives items with this opcode
_FILLED_BY = {"SETITEM": SkippedDict, "SETITEMS": SkippedDict, "APPEND": SkippedList, "APPENDS": SkippedList}
_GETS, _PUTS = {"GET", "BINGET", "LONG_BINGET"}, {"PUT", "BINPUT", "LONG_BINPUT"}


def stand_ins(path: Path) -> list[tuple[type, str]]:
    """``(stand-in class, global name)`` for each global in ``path`` that torch does not allow.

    Only zip checkpoints (``torch.save`` since PyTorch 1.6, so every Lightning checkpoint) can
    be listed; a legacy-format file gets none and loads only if it needs none.
    """
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        filled = filled_classes(path) if unsafe else {}
    except (ValueError, RuntimeError, KeyError, zipfile.BadZipFile):
        return []
    return [
        (
            type(
                name.rsplit(".", 1)[-1],
                (filled.get(name, SkippedObject),),
                {"__module__": __name__, "skipped": name},
            ),
            name,
        )
        for name in sorted(unsafe)
    ]


def filled_classes(path: Path) -> dict[str, type[SkippedObject]]:
    """``global name -> SkippedDict or SkippedList`` for each class whose objects the pickle of
    the zip checkpoint ``path`` gives items (a dict or list subclass).

    The opcodes run on a stack of placeholders: ``("class", name)`` for a global,
    ``("object", name)`` for what NEWOBJ or REDUCE builds from it, None for anything else.
    Names are as the pickle spells them; the Python 2 names that torch maps back (such as
    ``__builtin__.list``) are those of builtin types, whose objects pickles build with their own
    opcodes (EMPTY_DICT, EMPTY_LIST), not from the name.
    Raises ValueError if the pickle is malformed.
    """
    with zipfile.ZipFile(path) as archive:  # records sit in one folder, as torch's reader expects
        data = archive.read(archive.namelist()[0].split("/", 1)[0] + "/data.pkl")
    filled: dict[str, type[SkippedObject]] = {}
    stack: list[tuple[str, str] | None] = []
    marks: list[int] = []
    memo: dict[int, tuple[str, str] | None] = {}
    for op, arg, _ in pickletools.genops(data):
        if op.name == "MARK":
            marks.append(len(stack))
            continue
        count = len(op.stack_before)
        if pickletools.markobject in op.stack_before:
            if not marks:
                raise ValueError(f"{op.name} without MARK")
            del stack[marks.pop():]
            count = op.stack_before.index(pickletools.markobject)
        if count > len(stack) or (op.name in _PUTS and not stack):
            raise ValueError(f"{op.name} on a stack too short")
        operands = stack[len(stack) - count:]
        del stack[len(stack) - count:]
        if op.name == "GLOBAL":
            stack.append(("class", arg.replace(" ", ".")))
        elif op.name in ("NEWOBJ", "REDUCE"):
            made = operands[0]
            stack.append(("object", made[1]) if made and made[0] == "class" else None)
        elif op.name in _FILLED_BY or op.name == "BUILD":  # the target stays on the stack
            target = operands[0]
            if op.name in _FILLED_BY and target and target[0] == "object":
                filled[target[1]] = _FILLED_BY[op.name]
            stack.append(target)
        elif op.name in _GETS:
            stack.append(memo.get(arg))
        else:
            if op.name in _PUTS:
                memo[arg] = stack[-1]
            stack.extend([None] * len(op.stack_after))
    return filled


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
