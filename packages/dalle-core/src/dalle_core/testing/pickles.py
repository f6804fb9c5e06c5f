"""Pickles whose loading would run code, for tests of safe loading: a loader given a file
holding one of these must refuse it, and the file ``marker`` must not exist afterwards.

Each payload, when unpickled without restriction, creates ``marker`` in its own way: by
calling a function (`TouchOnUnpickle`), by a shell command (`SystemOnUnpickle`) or by
constructing an importable class (`ConstructOnUnpickle`).
"""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import torch


class TouchOnUnpickle:
    """Unpickling this calls ``Path.touch(marker)``: code execution by pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)

    def __deepcopy__(self, memo):  # copying a module that holds one must not go through pickle
        return self


class SystemOnUnpickle(TouchOnUnpickle):
    """Unpickling this runs a shell command that creates ``marker``."""

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class MarkerOnInit:
    """A class whose constructor creates the file ``marker``."""

    def __init__(self, marker: str):
        Path(marker).touch()


class ConstructOnUnpickle(TouchOnUnpickle):
    """Unpickling this constructs a `MarkerOnInit`: code run through an importable class."""

    def __reduce__(self):
        return MarkerOnInit, (str(self.marker),)  # a plain str: only the class is a global


#: payloads that call a function when unpickled
CALLS = (TouchOnUnpickle, SystemOnUnpickle)
#: every payload
PAYLOADS = (*CALLS, ConstructOnUnpickle)


def write_code_pickle(path: Path, marker: Path, payload: type = TouchOnUnpickle,
                      tensors: dict[str, torch.Tensor] | None = None) -> None:
    """A ``torch.save`` file at ``path`` holding ``tensors`` (weights, by default one) beside
    ``payload(marker)``, an object whose unpickling creates ``marker``."""
    weights = {"weight": torch.zeros(2, 2)} if tensors is None else tensors
    torch.save({**weights, "payload": payload(marker)}, path)
