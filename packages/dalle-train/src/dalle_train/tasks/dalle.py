"""Training DALLE: tokenize captions, the loss, and sample grids for fixed prompts."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dalle_core import DALLE
from dalle_train.config import CaptionedData, Section
from dalle_train.data.shapes import COLOURS, POSITIONS, PROMPTS, SHAPES, SIZES, Spec, judge, score
from dalle_train.datasets import first_samples
from dalle_train.errors import TrainError
from dalle_train.pictures import image_rows, save_png
from dalle_train.training.loop import Task

#: sample grids: prompts (when none are given, distinct captions of the first samples) and
#: images per prompt
SAMPLE_PROMPTS, IMAGES_PER_PROMPT = 4, 2


def tokenize_captions(tokenizer: Any, captions: list[str], sources: list[str], length: int,
                      truncate: bool) -> Tensor:
    """``LongTensor[B, length]``; a caption too long without truncation is a `TrainError`
    naming its file."""
    try:
        return tokenizer.tokenize(captions, length, truncate_text=truncate)
    except ValueError:
        for caption, source in zip(captions, sources):
            if len(tokenizer.encode(caption)) > length:
                raise TrainError(
                    f"the caption of {source} is {len(tokenizer.encode(caption))} tokens, longer than "
                    f"--text-seq-len {length}: pass --truncate-captions or raise --text-seq-len"
                ) from None
        raise


def default_prompts(dataset: Any, count: int) -> list[str]:
    """Distinct captions of the first samples of ``dataset``."""
    prompts: list[str] = []
    for sample in first_samples(dataset, 64):
        if sample.caption not in prompts:
            prompts.append(sample.caption)
        if len(prompts) == count:
            break
    return prompts


@dataclass(frozen=True)
class DalleTraining(Section):
    """Where a DALLE run starts, caption dropout, and the prompts of its sample grids."""

    #: a DALLE checkpoint to start from (a run's checkpoint directory resumes it exactly)
    dalle_path: Path | None
    #: probability of dropping the caption, for classifier-free guidance
    null_cond_prob: float
    #: prompts separated by ``|``; None: captions of the first samples
    sample_prompts: str | None


class DalleTask(Task):
    """Caption + image -> DALLE loss (the VAE encodes the images inside the model, in fp32)."""

    name = "dalle"

    def __init__(self, model: DALLE, training: DalleTraining, data: CaptionedData, seed: int,
                 device: torch.device, dataset: Any) -> None:
        if model.tokenizer is None:
            raise TrainError("the DALLE has no tokenizer: pass --tokenizer (see dalle-train plugins)")
        self.model, self.device = model, device
        self.text_seq_len, self.truncate = model.text_seq_len, data.truncate_captions
        self.null_cond_prob, self.seed = training.null_cond_prob, seed
        self.tokens_per_sample = model.text_seq_len + model.image_seq_len
        given = [p.strip() for p in (training.sample_prompts or "").split("|") if p.strip()]
        self.shapes = data.dataset == "shapes"
        if self.shapes and not given:
            given = [Spec(*prompt).caption() for prompt in PROMPTS[:SAMPLE_PROMPTS]]
        self.prompts = given or default_prompts(dataset, SAMPLE_PROMPTS)

    def loss(self, batch: Any, step: int) -> Tensor:
        text = tokenize_captions(self.model.tokenizer, batch.captions, batch.sources, self.text_seq_len,
                                 self.truncate)
        images = batch.images.to(self.device, non_blocking=True)  # pinned on CUDA: the copy overlaps
        return self.net(text.to(self.device), images, return_loss=True,
                          null_cond_prob=self.null_cond_prob)

    def write_samples(self, step: int, directory: Path) -> dict[str, Path | float]:
        prompts = [p for p in self.prompts for _ in range(IMAGES_PER_PROMPT)]
        text = self.model.tokenizer.tokenize(prompts, self.text_seq_len, truncate_text=True)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        images = self.model.generate_images(text.to(self.device), filter_thres=0.9, generator=generator)
        rows = [(p, images[i * IMAGES_PER_PROMPT:(i + 1) * IMAGES_PER_PROMPT], None)
                for i, p in enumerate(self.prompts)]
        path = directory / f"dalle-step-{step:07d}.png"
        save_png(image_rows(rows, scale=max(1, 128 // self.model.image_size),
                            title=f"DALLE samples at step {step}"), path)
        written: dict[str, Path | float] = {"samples": path}
        if self.shapes:  # what the pixel checker reads back, against the prompt
            combos = product(SIZES, COLOURS, SHAPES, POSITIONS)
            wanted = {spec.caption(): spec for spec in (Spec(*c) for c in combos)}
            seen = [judge(image) for image in images.float().cpu()]
            pairs = [(wanted[p], s) for p, s in zip(prompts, seen) if p in wanted]
            if pairs:
                written.update({f"checker_{k}": v for k, v in score(pairs).items()})
        return written
