"""Compiled generation steps kept on disk, so that another process loads instead of compiling.

Under ``default_cache_dir() / "compiled-steps"`` (``$DALLE_CACHE_DIR``, see `dalle_core.download`)
each entry is ``<key>.pt2``, the AOTInductor package, and ``<key>.sha256``, its digest, written
last. The key is a SHA-256 over everything the compiled code depends on: the torch version and
the CPU's vector capability, the source of the modules that define the step, the model's
configuration and weights (its VAE left out: the step ends at the image logits), and the call
shape (rows, sequence length, dtype, torch threads). A changed weight is a new key. A package
whose digest does not match (truncated, half-written, edited) or that fails to load is deleted
and compiled again, never used.

The folder is bounded: after a store, the entries least recently used (a load touches its
package) are deleted until the folder holds at most ``$DALLE_COMPILED_STEPS_MAX_MB`` megabytes
(default `DEFAULT_MAX_MB`); the entry just stored is always kept.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dalle_core.download import default_cache_dir, sha256_of
from dalle_core.pretrained import atomic_write_bytes

logger = logging.getLogger(__name__)

FOLDER = "compiled-steps"
MAX_MB_ENV = "DALLE_COMPILED_STEPS_MAX_MB"
DEFAULT_MAX_MB = 2048  # about 200 packages of the demo's DALLE (9.3 MB each)
FORMAT = 2  # bumped when what an entry holds changes
#: the modules whose code the compiled step is made of
STEP_MODULES = (
    "dalle_core.decoder_step",
    "dalle_core.transformer",
    "dalle_core.layers",
    "dalle_core.attention.patterns",
    "dalle_core.dalle",
)


def cache_folder() -> Path:
    """Where compiled steps are kept."""
    return default_cache_dir() / FOLDER


def step_key(
    model: nn.Module, *, rows: int, max_len: int, dtype: torch.dtype, threads: int, head: str = "image"
) -> str:
    """Hex SHA-256 naming the compiled step of ``model`` for one call shape and ``head``."""
    digest = hashlib.sha256()
    record = {
        "format": FORMAT,
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "config": getattr(model, "config", None),
        "call": [rows, max_len, str(dtype), threads, head],
    }
    digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    for name in STEP_MODULES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    for name, tensor in model.state_dict().items():
        if name.startswith("vae."):
            continue
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load(key: str) -> Any | None:
    """The loaded package of ``key`` if the disk holds a whole, loadable one, else None (a bad
    entry is deleted)."""
    package, digest = _paths(key)
    if not package.exists() and not digest.exists():
        return None
    problem = None
    if not package.exists() or not digest.exists():
        problem = "incomplete"
    elif sha256_of(package) != digest.read_text().strip():
        problem = "its digest does not match: truncated or changed"
    else:
        try:
            runner = torch._inductor.aoti_load_package(str(package))
            logger.info("loaded the compiled generation step from %s", package)
            os.utime(package)  # recently used: evicted last
            return runner
        except Exception as error:  # a package of another build that slipped through
            problem = f"it does not load ({type(error).__name__}: {error})"
    logger.warning("compiled step %s is not used, %s: compiling again", package, problem)
    package.unlink(missing_ok=True)
    digest.unlink(missing_ok=True)
    return None


def store(key: str, build: Callable[[Path], None]) -> Any:
    """Run ``build(path)`` (it writes a package at ``path``), keep the package under ``key``
    and return it loaded."""
    package, digest = _paths(key)
    package.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=package.parent, prefix=".building-") as folder:
        built = Path(folder) / "step.pt2"
        build(built)
        checksum = sha256_of(built)
        os.replace(built, package)
    atomic_write_bytes(digest, (checksum + "\n").encode())  # last: the entry is whole
    evict(keep=package)
    return torch._inductor.aoti_load_package(str(package))


def max_bytes() -> int:
    """The folder's bound: ``$DALLE_COMPILED_STEPS_MAX_MB`` megabytes, else `DEFAULT_MAX_MB`."""
    value = os.environ.get(MAX_MB_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_MB * 2**20
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if megabytes < 0:
        raise ValueError(f"{MAX_MB_ENV} must be a number of megabytes >= 0, got {value!r}")
    return int(megabytes * 2**20)


def evict(keep: Path) -> None:
    """Delete the least recently used entries (by their package's modification time) until the
    folder holds at most `max_bytes`; ``keep`` (a package) stays whatever its size."""
    limit = max_bytes()
    packages = sorted(cache_folder().glob("*.pt2"), key=lambda path: path.stat().st_mtime)
    sizes = {path: path.stat().st_size for path in packages}
    total = sum(sizes.values())
    for package in packages:
        if total <= limit:
            break
        if package == keep:
            continue
        package.with_suffix(".sha256").unlink(missing_ok=True)  # first: no whole entry remains
        package.unlink(missing_ok=True)
        total -= sizes[package]
        logger.info("deleted the compiled step %s, the least recently used (%s)", package, MAX_MB_ENV)


def _paths(key: str) -> tuple[Path, Path]:
    folder = cache_folder()
    return folder / f"{key}.pt2", folder / f"{key}.sha256"
