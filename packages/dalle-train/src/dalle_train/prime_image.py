"""``dalle-train generate --img PATH [--num-init-img-tokens N | --mask PNG]``: the image that
primes or is inpainted, and its mask, as tensors the size the model takes.

Both files are cropped to their largest centred square and resized to the model's image size
(the image bilinearly, the mask to the nearest pixel), so a mask drawn over the image file lines
up with it whatever its size. In the mask, white (grey level above 127) marks what is generated;
black is kept.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dalle_train.data.images import CorruptImageError, centred_square, load_image
from dalle_train.errors import TrainError
from dalle_train.imageio import to_tensor

MASK_THRESHOLD = 127  # grey levels above it are generated


def read_image(path: Path, size: int, channels: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``--img``: ``[1, C, size, size]`` in [0, 1], and the file's (width, height)."""
    try:
        image = load_image(path, channels)
    except CorruptImageError as error:
        raise TrainError(f"--img {error}") from error
    square = centred_square(image, size, Image.Resampling.BILINEAR)
    return to_tensor(square)[None], image.size


def read_mask(path: Path, size: int, image_size: tuple[int, int]) -> torch.Tensor:
    """``--mask``: ``BoolTensor[1, 1, size, size]``, true where the image is generated. The mask
    file must have the --img file's width and height; an all-black mask generates nothing."""
    try:
        mask = load_image(path, 3).convert("L")
    except CorruptImageError as error:
        raise TrainError(f"--mask {error}") from error
    if mask.size != image_size:
        raise TrainError(f"--mask {path} is {mask.width}x{mask.height} pixels but the --img file is "
                         f"{image_size[0]}x{image_size[1]}: draw the mask over the image, at its size")
    square = centred_square(mask, size, Image.Resampling.NEAREST)
    generated = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8).view(1, 1, size, size)
    if not bool((generated > MASK_THRESHOLD).any()):
        raise TrainError(f"--mask {path} is black everywhere (at {size}x{size} pixels): white marks what "
                         f"is generated, so nothing would be")
    return generated > MASK_THRESHOLD
