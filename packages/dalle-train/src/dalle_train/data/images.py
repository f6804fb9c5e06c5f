"""Reading image files into RGB or RGBA with Pillow, and upstream's random resized crop.

Upstream (DALLE-pytorch's ``TextImageDataset``) converted every image to RGB (RGBA with
``--transparent``) and applied ``T.RandomResizedCrop(image_size, scale=(resize_ratio, 1.),
ratio=(1., 1.))``. `random_resized_crop` draws crops from the same distribution as torchvision
does, from a `torch.Generator` the caller seeds (so they are reproducible), and resizes with
Pillow (bilinear, antialiased, as torchvision does for PIL images).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image, ImageOps

#: file name endings read as images (compared lower-cased)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

#: what transparent pixels become when an image with alpha is read with ``channels=3``
BACKGROUND = (255, 255, 255)

#: what Pillow raises for a file it cannot decode: unknown format, truncated data, broken
#: chunks, absurd sizes (DecompressionBombError subclasses Exception only)
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, Image.DecompressionBombError,
)


class CorruptImageError(Exception):
    """An image file that Pillow cannot read in full; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str | Path | BinaryIO, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_image(path: str | Path | BinaryIO, channels: int = 3, name: str | None = None) -> Image.Image:
    """Read ``path`` (a file, or the bytes of one) in full as mode RGB (``channels=3``) or RGBA
    (``channels=4``); ``name`` is what errors call it (default: ``path``).

    Palette, grayscale (8- or 16-bit), LA, CMYK and other modes are converted; an image with
    transparency (alpha band or palette/grayscale transparency) keeps it as RGBA, and with
    ``channels=3`` is laid over `BACKGROUND` rather than showing whatever colour its
    transparent pixels hold. The EXIF orientation is applied. A file that cannot be decoded
    (not an image, truncated, broken) raises `CorruptImageError`.
    """
    if channels not in (3, 4):
        raise ValueError(f"channels must be 3 (RGB) or 4 (RGBA), not {channels}")
    try:
        with Image.open(path) as image:
            image.load()  # decodes everything: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError as error:
        raise CorruptImageError(name or path, f"cannot be read: {error.strerror}") from error
    except _DECODE_ERRORS as error:
        reason = f"not a readable image ({type(error).__name__}: {error})"
        raise CorruptImageError(name or path, reason) from error
    return _convert(image, channels)


def _convert(image: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> RGB or RGBA, as `load_image` describes."""
    if image.mode.startswith("I"):  # 16-bit grayscale: scale to 8 bits instead of clipping
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if image.mode == ("RGBA" if channels == 4 else "RGB"):
        return image
    has_alpha = "A" in image.getbands() or image.has_transparency_data
    if not has_alpha:
        return image.convert("RGB").convert("RGBA") if channels == 4 else image.convert("RGB")
    rgba = image.convert("RGBA")
    if channels == 4:
        return rgba
    canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def crop_box(
    width: int, height: int, lower_ratio: float, generator: torch.Generator
) -> tuple[int, int, int]:
    """``(left, top, side)`` of a square crop covering a fraction in ``[lower_ratio, 1]`` of a
    ``width`` x ``height`` image's area: torchvision's ``RandomResizedCrop.get_params`` with
    ``scale=(lower_ratio, 1), ratio=(1, 1)`` (10 tries, then the centred largest square)."""
    if not 0 < lower_ratio <= 1:
        raise ValueError(f"lower_ratio must be in (0, 1], not {lower_ratio}")
    area = width * height
    for _ in range(10):
        target = area * torch.empty(1).uniform_(lower_ratio, 1.0, generator=generator).item()
        side = int(round(math.sqrt(target)))
        if 0 < side <= width and side <= height:
            top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
            return left, top, side
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def random_resized_crop(
    image: Image.Image, size: int, lower_ratio: float, generator: torch.Generator
) -> Image.Image:
    """A random square crop (see `crop_box`) of ``image``, resized to ``size`` x ``size``.

    Deterministic given the generator's state; the mode (RGB/RGBA) is kept, and Pillow resizes
    RGBA with premultiplied alpha, so transparent pixels do not bleed into the edges.
    """
    left, top, side = crop_box(image.width, image.height, lower_ratio, generator)
    crop = image.crop((left, top, left + side, top + side))  # as torchvision: crop, then resize
    return crop.resize((size, size), Image.Resampling.BILINEAR)


def centred_square(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """The largest centred square of ``image``, resized to ``size`` x ``size`` with ``resample``
    (the crop `crop_box` falls back to, without drawing)."""
    side = min(image.width, image.height)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), resample)
