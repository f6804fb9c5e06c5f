"""Training CLIP on image-text pairs, with retrieval accuracy on a held-out batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from dalle_core import CLIP
from dalle_train.pictures import save_png
from dalle_train.tasks.dalle import tokenize_captions
from dalle_train.training.loop import Task


def similarity_plot(sim: Tensor, path: Path, title: str) -> None:
    """Heat map of ``sim [B, B]`` (text i vs image j); the diagonal holds the true pairs."""
    cell, margin = max(4, 256 // sim.shape[0]), 24
    size = cell * sim.shape[0]
    canvas = Image.new("RGB", (size + 2 * margin, size + 2 * margin), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 4), title, fill="black")
    low, high = float(sim.min()), float(sim.max())
    scaled = (sim - low) / max(high - low, 1e-6)  # [B, B] in [0, 1]
    for i, row in enumerate(scaled.tolist()):
        for j, value in enumerate(row):
            shade = int(255 * (1 - value))
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255))
    save_png(canvas, path)


class ClipTask(Task):
    """Caption + image -> symmetric contrastive loss; held-out pairs measure retrieval."""

    name = "clip"

    def __init__(self, model: CLIP, tokenizer: Any, truncate_captions: bool, device: torch.device,
                 held: list[Any]) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.text_seq_len, self.truncate = model.text_seq_len, truncate_captions
        self.held = held

    def text(self, batch_captions: list[str], sources: list[str]) -> Tensor:
        return tokenize_captions(self.tokenizer, batch_captions, sources, self.text_seq_len,
                                 self.truncate).to(self.device)

    def loss(self, batch: Any, step: int) -> Tensor:
        text = self.text(batch.captions, batch.sources)
        images = batch.images.to(self.device, non_blocking=True)  # pinned on CUDA
        return self.net(text, images, text_mask=text != 0, return_loss=True)

    def write_samples(self, step: int, directory: Path) -> dict[str, Path | float]:
        if len(self.held) < 2:
            return {}
        text = self.text([s.caption for s in self.held], [s.source for s in self.held])
        images = torch.stack([s.image for s in self.held]).to(self.device)
        sim = self.model.embed_text(text, text != 0) @ self.model.embed_image(images).t()  # [B, B]
        target = torch.arange(len(self.held), device=sim.device)
        text_to_image = float((sim.argmax(dim=1) == target).float().mean())
        image_to_text = float((sim.argmax(dim=0) == target).float().mean())
        path = directory / f"clip-step-{step:07d}.png"
        similarity_plot(sim.float().cpu(), path, f"step {step}: text->image top-1 {text_to_image:.0%}, "
                        f"image->text {image_to_text:.0%} ({len(self.held)} held-out pairs)")
        return {"retrieval": path, "text_to_image_top1": text_to_image, "image_to_text_top1": image_to_text}
