"""A served image as PNG bytes that carry what made it, so a downloaded file keeps its settings."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image, PngImagePlugin

from dalle_train.pictures import image_grid, slug
from dalle_train.serve.batcher import FinishedImage

#: the PNG text chunk holding the settings as JSON (``Image.open(f).text[SETTINGS_KEY]``)
SETTINGS_KEY = "dalle-settings"


def png_bytes(image: FinishedImage, settings: dict[str, Any]) -> bytes:
    """``image`` as PNG, its ``settings`` (the request's, plus its index and score) in a text
    chunk, and the prompt in the standard ``Description`` chunk."""
    picture = image_grid(image.pixels[None], nrow=1, padding=0)
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", str(settings.get("prompt", "")))
    info.add_text(SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_settings(data: bytes) -> dict[str, Any]:
    """The settings a PNG from `png_bytes` carries."""
    with Image.open(io.BytesIO(data)) as picture:
        return json.loads(picture.text[SETTINGS_KEY])


def download_name(settings: dict[str, Any]) -> str:
    """A file name for a downloaded image: prompt, seed and index."""
    return f"{slug(str(settings['prompt']), 60) or 'image'}-seed{settings['seed']}-{settings['index']}.png"
