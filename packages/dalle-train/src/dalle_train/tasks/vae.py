"""Training the DiscreteVAE: Gumbel temperature annealing, reconstructions, codebook usage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from dalle_core import DiscreteVAE
from dalle_train.config import Section
from dalle_train.errors import TrainError
from dalle_train.pictures import image_rows, save_png
from dalle_train.training.loop import Task

#: upstream train_vae.py annealed the temperature once per 100 steps
ANNEAL_EVERY = 100
#: images encoded to measure codebook usage at each sample step
USAGE_SAMPLES = 256


def vae_temperature(step: int, start: float, minimum: float, rate: float) -> float:
    """Upstream's schedule as a function of the step: every 100 steps (at steps 0, 100, ...)
    ``temp = max(temp * exp(-rate * step), minimum)``, so after n updates the exponent is
    ``-rate * 100 * (0 + 1 + ... + n - 1)``."""
    updates = step // ANNEAL_EVERY + 1
    return max(start * math.exp(-rate * ANNEAL_EVERY * updates * (updates - 1) / 2), minimum)


def codebook_plot(counts: Tensor, path: Path) -> None:
    """Bar chart of how often each code was used (``counts [num_tokens]``), dead codes red."""
    width, height, margin = 640, 200, 24
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    used, total = int((counts > 0).sum()), counts.numel()
    draw.text((margin, 4), f"codebook usage: {used}/{total} codes used, {total - used} dead", fill="black")
    top = float(counts.max().clamp(min=1))
    bar = (width - 2 * margin) / total
    for code, count in enumerate(counts.tolist()):
        x = margin + code * bar
        if count == 0:
            draw.line([x, height - margin, x, height - margin + 4], fill=(200, 40, 40))
        else:
            y = height - margin - (height - 2 * margin - 12) * count / top
            draw.rectangle([x, y, x + max(bar - 0.5, 0.5), height - margin], fill=(40, 80, 170))
    save_png(canvas, path)


@dataclass(frozen=True)
class VaeTraining(Section):
    """The Gumbel temperature's annealing (as upstream) and the reconstruction grids."""

    starting_temp: float
    temp_min: float
    anneal_rate: float
    num_images_save: int


class VaeTask(Task):
    """Images -> reconstruction loss (+ KL), at the annealed Gumbel temperature."""

    name = "vae"

    def __init__(self, model: DiscreteVAE, training: VaeTraining, device: torch.device, dataset: Any) -> None:
        self.model, self.device = model, device
        self.start, self.minimum, self.rate = training.starting_temp, training.temp_min, training.anneal_rate
        count = min(len(dataset), USAGE_SAMPLES)
        picked = [s for s in (dataset[i] for i in range(count)) if s is not None]
        if not picked:
            raise TrainError(f"none of the first {count} images could be read (the warnings above name "
                             f"each file): replace them or use other data")
        self.held = torch.stack([s.image for s in picked])  # [n, C, H, W]
        self.shown = max(1, min(training.num_images_save, len(self.held)))

    def temperature(self, step: int) -> float:
        return vae_temperature(step, self.start, self.minimum, self.rate)

    def status(self, step: int) -> dict[str, float]:
        return {"temperature": self.temperature(step)}

    def loss(self, batch: Any, step: int) -> Tensor:
        images = batch.images.to(self.device, non_blocking=True)  # pinned on CUDA
        return self.net(images, return_loss=True, temp=self.temperature(step))

    def write_samples(self, step: int, directory: Path) -> dict[str, Path | float]:
        images = self.held.to(self.device)
        codes = torch.cat([self.model.get_codebook_indices(chunk) for chunk in images.split(64)])  # [n, f*f]
        shown = images[: self.shown]
        soft = self.model(shown, temp=self.temperature(step)).clamp(0, 1)  # [n, C, H, W]
        hard = self.model.decode(codes[: self.shown])
        recons = directory / f"vae-step-{step:07d}.png"
        save_png(image_rows([("originals", shown, None), ("reconstructions (soft, Gumbel)", soft, None),
                             ("reconstructions from the codes", hard, None)],
                            scale=max(1, 96 // self.model.image_size), title=f"VAE at step {step}"), recons)
        counts = torch.bincount(codes.flatten().cpu(), minlength=self.model.num_tokens)  # [num_tokens]
        usage = directory / f"codebook-step-{step:07d}.png"
        codebook_plot(counts, usage)
        dead = int((counts == 0).sum())
        print(f"\nvae step {step}: {self.model.num_tokens - dead}/{self.model.num_tokens} codes used "
              f"on {len(images)} images ({dead} dead)")
        mse = float((self.model.decode(codes) - images).pow(2).mean())
        return {"reconstructions": recons, "codebook": usage, "dead_codes": dead, "hard_recon_mse": mse}
