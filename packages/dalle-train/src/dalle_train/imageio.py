"""Pillow images <-> tensors (no torchvision).

Tensors are float ``[C, H, W]`` (or ``[B, C, H, W]``) in [0, 1]; C is 3 (RGB) or 4 (RGBA).
"""

from __future__ import annotations

import torch
from PIL import Image

MODES = {3: "RGB", 4: "RGBA"}


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image in mode RGB or RGBA -> float ``[C, H, W]`` in [0, 1]."""
    return to_bytes(image).float() / 255


def to_bytes(image: Image.Image) -> torch.Tensor:
    """A PIL image in mode RGB or RGBA -> its pixels, uint8 ``[C, H, W]`` (`to_tensor` times 255)."""
    channels = {mode: c for c, mode in MODES.items()}.get(image.mode)
    if channels is None:
        raise ValueError(f"image mode {image.mode!r}: convert to RGB or RGBA first")
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # [H*W*C]
    return data.view(image.height, image.width, channels).permute(2, 0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    """Float ``[C, H, W]`` in [0, 1] (C = 3 or 4) -> PIL image (RGB or RGBA)."""
    channels, height, width = image.shape
    if channels not in MODES:
        raise ValueError(f"images with {channels} channels cannot be written: expected 3 or 4")
    data = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    data = data.permute(1, 2, 0).contiguous().cpu()  # [H, W, C]
    return Image.frombytes(MODES[channels], (width, height), data.numpy().tobytes())
