"""Checkpoints as directories: ``config.json`` + ``model.safetensors``, written atomically.

`PretrainedMixin` gives a model `save_pretrained(dir)` and `from_pretrained(dir)`. A model
records its constructor keywords in ``self.config`` (JSON values only); parts that are objects
(a DALLE's VAE) are saved by the model in subfolders through `save_parts`/`load_parts`.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def package_version(distribution: str) -> str:
    """Installed version of ``distribution``, or ``"unknown"`` when run from a source tree."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through `atomic_write_bytes` (for training state: tensors and plain data)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_failure(error: Exception) -> str:
    """Why loading a file with ``torch.load(weights_only=True)`` failed, in one line. torch's
    refusals are lines of advice on loading the file unsafely: of those, only the object refused
    (when one is named) is shown."""
    text = str(error).strip()
    if text.startswith("Weights only load failed"):
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        return (f"it holds {refused[1]}, which is never unpickled: that could run code" if refused
                else "it holds more than tensors and plain data")
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_config(directory: Path) -> dict[str, Any]:
    """Read ``config.json`` of a checkpoint directory, with an error that names what is wrong."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a checkpoint directory: {CONFIG_NAME} is missing "
            f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}, as written by save_pretrained)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    for field in ("class", "config"):
        if field not in meta:
            raise ValueError(f"{path} has no '{field}' field; it was not written by save_pretrained")
    return meta


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with a copy of each tensor whose memory an earlier one shares (modules shared
    between layers appear under each layer's name; safetensors stores no shared memory). The
    model that loads it is built with the same sharing, so it ties them again."""
    seen: set[int] = set()
    result = {}
    for key, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        result[key] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return result


def load_state_strict(model: torch.nn.Module, path: Path, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Load safetensors weights into ``model``; missing or unexpected keys are an error.

    Keys under ``skip_prefixes`` (parts loaded from their own folders) are not expected here.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint has no weights")
    try:
        state = load_file(path)
    except SafetensorError as error:  # e.g. a pickle (torch.save) file: never unpickled here
        raise ValueError(f"{path} is not a safetensors file ({error}); weights are only read "
                         f"from safetensors, as written by save_pretrained") from error
    expected = {k for k in model.state_dict() if not k.startswith(skip_prefixes)}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise KeyError(
            f"{path} does not fit {type(model).__name__}: "
            f"missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}"
        )
    model.load_state_dict(state, strict=False)


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` with a ``config`` dict.

    ``plugin_name`` is the registry name of the class (``"discrete"`` for `DiscreteVAE`), so a
    saved part can be rebuilt through the plugin registry by name.
    """

    plugin_name: ClassVar[str] = ""
    distribution: ClassVar[str] = "dalle-core"
    config: dict[str, Any]

    def save_parts(self, directory: Path) -> tuple[str, ...]:
        """Save sub-models into subfolders; return the state-dict prefixes they cover."""
        return ()

    @classmethod
    def load_parts(cls, directory: Path, config: dict[str, Any]) -> dict[str, Any]:
        """Rebuild the objects `save_parts` wrote, as constructor keywords."""
        return {}

    @classmethod
    def skipped_prefixes(cls, config: dict[str, Any]) -> tuple[str, ...]:
        """State-dict prefixes that `load_parts` restores (not in this model's weights file)."""
        return ()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (and parts) into ``directory``."""
        assert isinstance(self, torch.nn.Module)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        skip = self.save_parts(directory)
        state = unshared({
            key: tensor.detach().contiguous().cpu()
            for key, tensor in self.state_dict().items()
            if not key.startswith(skip)
        })
        atomic_write_bytes(directory / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
        meta = {
            "format_version": FORMAT_VERSION,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "name": self.plugin_name,
            "package": self.distribution,
            "version": package_version(self.distribution),
            "config": self.config,
        }
        write_json(directory / CONFIG_NAME, meta)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu"):
        """Rebuild a model saved by `save_pretrained`; errors name the file and what is wrong."""
        directory = Path(directory)
        meta = read_config(directory)
        expected_class = f"{cls.__module__}.{cls.__qualname__}"
        if meta["class"] != expected_class:
            raise ValueError(
                f"{directory / CONFIG_NAME} holds a {meta['class']}, not a {expected_class}"
            )
        config = meta["config"]
        model = cls(**config, **cls.load_parts(directory, config))
        load_state_strict(model, directory / WEIGHTS_NAME, cls.skipped_prefixes(config))
        return model.to(map_location)
