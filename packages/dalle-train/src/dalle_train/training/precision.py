"""Numeric precision of a training run: fp32, bf16 (autocast) or fp16 (autocast + loss scaling).

The VAE always runs in fp32 (`DALLE` encodes and decodes with it outside autocast), so only the
model being trained is affected.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from dalle_train.errors import TrainError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_from_flags(precision: str | None, fp16: bool = False, amp: bool = False) -> str:
    """``--precision``, with the upstream ``--fp16`` / ``--amp`` mapped onto ``fp16``."""
    if (fp16 or amp) and precision not in (None, "fp16"):
        flag = "--fp16" if fp16 else "--amp"
        raise TrainError(f"{flag} means --precision fp16; it cannot be combined with --precision {precision}")
    if fp16 or amp:
        return "fp16"
    return precision or "fp32"


@dataclass(frozen=True)
class Precision:
    """One of `PRECISIONS` on a device: an autocast context and a gradient scaler."""

    name: str
    device: torch.device

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise TrainError(f"--precision {self.name}: expected one of {', '.join(PRECISIONS)}")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to bf16/fp16 on the device; nothing for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.name])

    def scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled for fp16 only (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")
