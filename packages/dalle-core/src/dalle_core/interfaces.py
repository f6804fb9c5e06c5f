"""The shapes plugins must fit: tokenizers, image VAEs, attention kernels, distributed backends.

Each interface is small on purpose. `DALLE` and the trainer only ever talk to these, so any
object that fits can be plugged in, registered or not.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class StepPlan:
    """How the trainer steps the optimizer, handed to `DistributedBackend.wrap`: what an engine
    that owns the step (DeepSpeed) must be configured with, and when gradients must be reduced
    (Horovod's accumulation)."""

    #: samples one process runs per forward (the trainer's per-process micro-batch)
    micro_batch_size: int
    #: micro-batches per optimizer step (``--ga-steps``)
    ga_steps: int = 1
    #: the gradients' norm is clipped to this before each step; None: no clipping
    clip_grad_norm: float | None = None
    #: ``fp32``, ``bf16`` or ``fp16`` (``--precision``)
    precision: str = "fp32"


class DistributedBackend(ABC):
    """Data-parallel training across processes. ``none`` is the one-process implementation.

    Lifecycle: construct (cheap, no imports of heavy libraries), `initialize`, then use, then
    `shutdown`. The trainer's one loop runs every backend through these methods: per optimizer
    step, each micro-batch's forward and `backward` run inside `accumulating` (gradients are
    reduced across processes on the last one only), then `step`; `average` and `any` make every
    process see the same loss and the same decision to stop; `gather_object` collects what each
    process must save (its random generators). An engine that owns backward, loss scaling and
    the optimizer step (DeepSpeed) overrides `backward` and `step`.

    Saving, collectively: `gathered` makes the root's model hold every full weight while the root
    writes the ordinary checkpoint (an engine that shards weights gathers them);
    `optimizer_state_dict` gives the optimizer's state in torch's ordinary form (or None when only
    the engine's own files hold it); `save_engine_state` writes the engine's own files beside the
    checkpoint for an exact resume, which `load_engine_state` reads back.
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
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, plan: StepPlan
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
        """Return the model and optimizer to train with (data-parallel wrappers); ``plan`` says
        how the trainer accumulates, clips and steps."""

    #: whether every process holds all the weights (compared across processes before saving);
    #: False for engines that shard them (FSDP, ZeRO-3)
    replicated: bool = True

    @abstractmethod
    def average(self, tensor: Tensor) -> Tensor:
        """Mean of ``tensor`` over all processes (a new tensor; the input is not changed)."""

    def device(self, requested: torch.device) -> torch.device:
        """The device this process trains on, given the one asked for (``--device``): a
        backend with one GPU per process picks ``cuda:<local_rank>``. Default: ``requested``."""
        return requested

    def accumulating(self, model: torch.nn.Module, sync: bool) -> AbstractContextManager[Any]:
        """Context of one micro-batch's forward and backward through the wrapped ``model``;
        ``sync`` is False for every micro-batch of an optimizer step but the last, so that
        gradients are reduced across processes once per step. Default: nothing to do."""
        return contextlib.nullcontext()

    def backward(self, loss: Tensor, scaler: torch.amp.GradScaler) -> None:
        """Backward of one micro-batch's loss (already divided by the accumulation steps),
        scaled by ``scaler`` (a no-op unless fp16)."""
        scaler.scale(loss).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip_grad_norm: float | None
    ) -> None:
        """The optimizer step after an accumulation's last micro-batch: unscale and clip the
        gradients to ``clip_grad_norm`` (None: no clipping), step, update the scaler, zero
        the gradients."""
        if clip_grad_norm:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any process; every process gets the same answer (so
        that all stop at the same step when one of them is asked to)."""
        return bool(self.average(torch.tensor(float(flag), device="cpu")).item() > 0)

    def gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every process, by rank, on every process (plain picklable data).
        Default, for a world of one: ``[obj]``."""
        return [obj]

    def shutdown(self) -> None:  # noqa: B027 (optional to override: most backends have nothing to leave)
        """Leave the process group at the end of a run. Default: nothing to leave."""

    def gathered(self, model: torch.nn.Module) -> AbstractContextManager[Any]:
        """Collective context in which the root's unwrapped ``model`` holds every weight, whole
        and as ordinary tensors, so that it can be saved as in one process. Default: the weights
        are whole already."""
        return contextlib.nullcontext()

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Collective: the optimizer's state in ``torch.optim`` form (parameters numbered in
        their groups' order), complete on the root; None when only the engine's own files
        (`save_engine_state`) hold it. Default: ``optimizer.state_dict()``."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load what `optimizer_state_dict` gave (possibly by another backend or number of
        processes) into the wrapped ``optimizer``. Default: ``optimizer.load_state_dict``."""
        optimizer.load_state_dict(state)

    def save_engine_state(self, directory: Path) -> bool:
        """Collective: write the engine's own training state (e.g. DeepSpeed's sharded
        checkpoint) under ``directory`` (a new folder of the checkpoint being written), for an
        exact resume with the same engine and number of processes; returns whether it wrote
        anything. Default: nothing beyond the ordinary checkpoint."""
        return False

    def load_engine_state(self, directory: Path) -> bool:
        """Collective: restore what `save_engine_state` wrote under ``directory`` when this
        backend and number of processes can (model, optimizer and engine state); returns
        whether it did (False: the trainer restores the ordinary checkpoint's state instead).
        Default: False."""
        return False
