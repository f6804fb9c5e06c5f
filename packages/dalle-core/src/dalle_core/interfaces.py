"""The shapes plugins must fit: tokenizers, image VAEs, attention kernels, distributed backends.

Each interface is small on purpose. `DALLE` and the trainer only ever talk to these, so any
object that fits can be plugged in, registered or not.
"""

from __future__ import annotations

import json
import pickle
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from dalle_core.padding import pad_batch

TOKENIZER_CONFIG = "tokenizer_config.json"


@runtime_checkable
class ImageVAE(Protocol):
    """An image tokenizer: pixels in [0, 1] to a grid of discrete codes and back.

    Attributes:
        image_size: side of the square images it takes, in pixels.
        channels: image channels (3 for RGB, 4 for RGBA, ...).
        num_tokens: size of the codebook; codes are in ``[0, num_tokens)``.
        fmap_size: codes per side, so an image becomes ``fmap_size ** 2`` codes.
    """

    image_size: int
    channels: int
    num_tokens: int
    fmap_size: int

    def get_codebook_indices(self, images: Tensor) -> Tensor:
        """``images [B, C, H, W]`` in [0, 1] -> codes ``LongTensor[B, fmap_size ** 2]``."""

    def decode(self, codes: Tensor) -> Tensor:
        """codes ``LongTensor[B, fmap_size ** 2]`` -> images ``[B, C, H, W]`` in [0, 1]."""


class Tokenizer(ABC):
    """A text tokenizer. Id 0 is padding and is never produced by `encode` for real text.

    Subclasses implement `vocab_size`, `encode`, `decode` and `config` (and may override
    `encode_batch`); `tokenize` (batching, padding, truncation) and saving are shared. A
    tokenizer that needs files (a vocabulary, a model) copies them in `save_files` and reads
    them back in `from_pretrained`.
    """

    #: the name it is registered under with ``dalle_register_tokenizers``
    plugin_name: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, padding included: every id is in ``[0, vocab_size)``."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> ids (no padding)."""

    @abstractmethod
    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids -> text; padding (0) and ids outside the vocabulary are dropped."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable keyword arguments that rebuild this tokenizer (files excluded)."""
        return {}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(text) for text in texts]``; a tokenizer with a faster batched path (native
        code, threads) overrides it."""
        return [self.encode(text) for text in texts]

    def tokenize(
        self, texts: str | Sequence[str], context_length: int, truncate_text: bool = False
    ) -> Tensor:
        """Encode a batch into ``LongTensor[B, context_length]``, right-padded with 0.

        A text longer than ``context_length`` is cut when ``truncate_text`` is true and is
        otherwise an error naming its index and length.
        """
        if isinstance(texts, str):
            texts = [texts]
        return pad_batch(self.encode_batch(list(texts)), context_length, truncate_text)

    def save_files(self, directory: Path) -> dict[str, Any]:
        """Copy any files the tokenizer needs into ``directory``; return extra config."""
        return {}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``tokenizer_config.json`` (and the tokenizer's files) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not self.plugin_name:
            raise ValueError(f"{type(self).__name__} has no plugin_name; it cannot be saved")
        config = {**self.config(), **self.save_files(directory)}
        meta = {"name": self.plugin_name, "config": config}
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, **config: Any) -> Tokenizer:
        """Rebuild from a directory written by `save_pretrained` (config already read)."""
        return cls(**config)


class DistributedBackend(ABC):
    """Data-parallel training across processes. ``none`` is the one-process implementation.

    Lifecycle: construct (cheap, no imports of heavy libraries), `initialize`, then use.
    """

    #: the name it is registered under with ``dalle_register_backends``
    plugin_name: str = ""

    @abstractmethod
    def initialize(self) -> None:
        """Join the process group (reads the launcher's environment)."""

    @property
    @abstractmethod
    def world_size(self) -> int:
        """Number of processes."""

    @property
    @abstractmethod
    def rank(self) -> int:
        """Global index of this process."""

    @property
    @abstractmethod
    def local_rank(self) -> int:
        """Index of this process on its machine (its GPU)."""

    @property
    def is_root(self) -> bool:
        """Whether this process logs, saves and downloads."""
        return self.rank == 0

    @abstractmethod
    def barrier(self) -> None:
        """Wait for every process."""

    @abstractmethod
    def wrap(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
        """Return the model and optimizer to train with (data-parallel wrappers)."""

    @abstractmethod
    def average(self, tensor: Tensor) -> Tensor:
        """Mean of ``tensor`` over all processes (a new tensor; the input is not changed)."""

    def save_checkpoint(self, state: dict[str, Any], path: str | Path) -> None:
        """Save training state (root only, atomically); every process waits for it."""
        from dalle_core.pretrained import atomic_torch_save

        if self.is_root:
            atomic_torch_save(state, Path(path))
        self.barrier()

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Load training state saved by `save_checkpoint` (tensors only, no pickled code)."""
        try:
            return torch.load(Path(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            from dalle_core.pretrained import load_failure

            raise pickle.UnpicklingError(
                f"{path} is not loaded: training state is read as tensors and plain data only "
                f"({load_failure(error)}); nothing in it was run"
            ) from error
