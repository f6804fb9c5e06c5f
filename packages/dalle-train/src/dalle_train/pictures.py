"""PNG pictures the command line writes: image grids, labelled rows of images, loss curves.

Images come in as float tensors in [0, 1], ``[B, C, H, W]`` or lists of ``[C, H, W]``, with C
= 1 (shown as grey), 3 (RGB) or 4 (RGBA). Files are written atomically with `save_png`, so a
reader never sees half a picture.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from dalle_core.pretrained import atomic_write_bytes
from dalle_train.imageio import to_pil

#: what to write under each image of a row: (text, RGB colour) per image, or None
Under = Sequence[tuple[str, tuple[int, int, int]]] | None
#: one row of `image_rows`: its label, its images, what to write under them
Row = tuple[str, Sequence[torch.Tensor] | torch.Tensor, Under]


def slug(text: str, max_length: int = 100) -> str:
    """A file-name-safe form of ``text``: lower case ASCII letters and digits joined by ``-``,
    at most ``max_length`` characters (``"A red Circle!"`` -> ``"a-red-circle"``); may be empty."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower())[:max_length].strip("-")


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` as a PNG at ``path`` atomically (temporary file, fsync, rename)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())


def _displayable(images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` with C in (1, 3, 4) -> C in (3, 4), float on the CPU."""
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise ValueError(
            f"images must be [B, C, H, W] with C = 1, 3 or 4 channels, got {list(images.shape)}"
        )
    images = images.detach().float().cpu()
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def image_grid(
    images: torch.Tensor | Sequence[torch.Tensor],
    nrow: int = 8,
    padding: int = 2,
    scale: int = 1,
    pad_value: float = 1.0,
) -> Image.Image:
    """Images ``[B, C, H, W]`` in [0, 1] tiled ``nrow`` per row (as torchvision's ``make_grid``).

    Each image is upscaled ``scale`` times (nearest neighbour, so pixels stay sharp) and
    surrounded by ``padding`` pixels of ``pad_value`` (1 = white). One image with
    ``padding=0`` is that image alone.
    """
    if not isinstance(images, torch.Tensor):
        images = torch.stack(list(images))
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(f"need nrow >= 1, padding >= 0, scale >= 1; got {nrow}, {padding}, {scale}")
    images = _displayable(images)
    if images.shape[0] == 0:
        raise ValueError("image_grid got no images")
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    count, channels, height, width = images.shape
    cols = min(nrow, count)
    rows = math.ceil(count / cols)
    canvas = torch.full(
        (channels, rows * (height + padding) + padding, cols * (width + padding) + padding), pad_value
    )  # [C, H_grid, W_grid]
    for index, image in enumerate(images):
        top = padding + (index // cols) * (height + padding)
        left = padding + (index % cols) * (width + padding)
        canvas[:, top : top + height, left : left + width] = image
    return to_pil(canvas)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` px (its fixed bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, face) -> tuple[int, int]:
    """(right, bottom) of ``text`` drawn at the origin: the room it needs."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    return int(right), int(bottom)


def image_rows(rows: Sequence[Row], scale: int = 1, title: str | None = None) -> Image.Image:
    """Rows of images upscaled ``scale`` times, each row with its label drawn above it and,
    when its ``under`` is given, a short coloured text under each image; ``title`` on top.

    ``rows``: ``(label, images, under)`` with ``images`` a ``[B, C, H, W]`` tensor or a list of
    ``[C, H, W]`` tensors in [0, 1] (any sizes: each cell is as large as the largest image)
    and ``under`` None or one ``(text, (r, g, b))`` per image.
    """
    if not rows:
        raise ValueError("image_rows got no rows")
    pad, face, small = 6, _font(13), _font(10)
    converted = []
    for label, images, under in rows:
        pictures = [
            to_pil(_displayable(image[None])[0]).resize(
                (image.shape[-1] * scale, image.shape[-2] * scale), Image.Resampling.NEAREST
            )
            for image in images
        ]
        if under is not None and len(under) != len(pictures):
            raise ValueError(f"row {label!r} has {len(pictures)} images but {len(under)} texts under them")
        converted.append((label, pictures, under))
    cell_w = max((p.width for _, pictures, _ in converted for p in pictures), default=0)
    cell_h = max((p.height for _, pictures, _ in converted for p in pictures), default=0)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_h = _text_size(probe, "Ag", face)[1] + 4
    under_h = _text_size(probe, "0.0", small)[1] + 3 if any(u for _, _, u in converted) else 0
    title_h = _text_size(probe, "Ag", face)[1] + 8 if title else 0
    row_h = label_h + cell_h + pad + under_h
    texts = [_text_size(probe, text, face)[0] + 2 * pad for text in [title or "", *(r[0] for r in converted)]]
    width = max(pad + max(len(pictures) for _, pictures, _ in converted) * (cell_w + pad), *texts)
    canvas = Image.new("RGB", (width, pad + title_h + len(converted) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    if title:
        draw.text((pad, y), title, fill=(90, 90, 90), font=face)
        y += title_h
    for label, pictures, under in converted:
        draw.text((pad, y), label, fill="black", font=face)
        for i, picture in enumerate(pictures):
            x = pad + i * (cell_w + pad)
            canvas.paste(picture.convert("RGB"), (x, y + label_h))
            if under:
                words, colour = under[i]
                draw.text((x, y + label_h + cell_h + 1), words, fill=colour, font=small)
        y += row_h
    return canvas


def loss_plot(curves: Mapping[str, Sequence[float]], path: str | Path) -> None:
    """Write a PNG with one panel per curve: the raw loss per step (light), its moving average
    (dark), on a log-scale y axis; a curve without values gets an empty panel."""
    if not curves:
        raise ValueError("loss_plot got no curves")
    panel_w, panel_h = 330, 240
    canvas = Image.new("RGB", (panel_w * len(curves), panel_h), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (name, values) in enumerate(curves.items()):
        _loss_panel(draw, p * panel_w, panel_w, panel_h, name, list(values))
    save_png(canvas, path)


def _loss_panel(
    draw: ImageDraw.ImageDraw, left: int, width: int, height: int, name: str, values: list[float]
) -> None:
    face = _font(11)
    x0, y0, x1, y1 = left + 48, 26, left + width - 12, height - 30
    draw.rectangle([x0, y0, x1, y1], outline=(150, 150, 150))
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        draw.text((x0, 6), f"{name} loss (no finite values)", fill="black", font=face)
        return
    last = finite[-20:]
    draw.text((x0, 6), f"{name} loss (last {len(last)} steps {sum(last) / len(last):.4f})",
              fill="black", font=face)
    logs = [math.log10(max(v, 1e-8)) if math.isfinite(v) else math.nan for v in values]
    low = min(v for v in logs if not math.isnan(v))
    high = max(v for v in logs if not math.isnan(v))
    if high - low < 1e-6:
        high = low + 1.0

    def point(i: int, value: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * i / max(len(values) - 1, 1)
        y = y1 - (y1 - y0) * (value - low) / (high - low)
        return x, y

    for k in range(5):  # y ticks
        value = low + (high - low) * k / 4
        _, y = point(0, value)
        draw.line([x0 - 3, y, x0, y], fill=(120, 120, 120))
        draw.text((left + 2, y - 6), f"{10 ** value:.3g}", fill=(80, 80, 80), font=face)
    for k in range(3):  # x ticks
        i = (len(values) - 1) * k // 2
        x, _ = point(i, low)
        draw.text((x - 8, y1 + 4), str(i), fill=(80, 80, 80), font=face)
    draw.text((x1 - 30, y1 + 16), "step", fill=(80, 80, 80), font=face)
    if len(finite) > 1:
        kept = [(i, v) for i, v in enumerate(logs) if not math.isnan(v)]  # NaN/inf steps skipped
        draw.line([point(i, v) for i, v in kept], fill=(180, 200, 235), width=1)
        window = max(len(kept) // 30, 1)
        smooth, total = [], 0.0
        for n, (i, v) in enumerate(kept):
            total += v - (kept[n - window][1] if n >= window else 0.0)
            smooth.append(point(i, total / min(n + 1, window)))
        draw.line(smooth, fill=(25, 70, 160), width=2)
