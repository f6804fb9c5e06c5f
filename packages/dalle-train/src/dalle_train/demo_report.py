"""What ``dalle-train demo`` measures besides its generated images, and its ``report.md``.

The pixel checker (`dalle_train.data.shapes.judge`) scores every image against the prompt it was
made for. Its figures only mean something next to two others, measured here:

- chance: the agreement of a uniform guess (one colour in five, one shape in four, ...);
- the VAE's ceiling: the checker's agreement on the VAE's reconstructions from hard codes of
  held-out dataset pictures. The DALLE generates codes that this VAE decodes, so a generated
  picture can at best look as right as a reconstruction does.

The held-out pictures are the dataset's own (same seed) past the indices the models trained on.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dalle_train.data.seeding import mix
from dalle_train.data.shapes import (
    COLOURS,
    POSITIONS,
    PROMPTS,
    SHAPES,
    SIZES,
    ShapesDataset,
    Spec,
    judge,
    random_spec,
    score,
)

#: the checker's fields, in the report's order ("all": the four at once)
FIELDS = ("colour", "shape", "position", "size", "all")
#: mixed with the seed for the drawn prompts' generator, so that it is not the generator any
#: other part of the demo seeds with the seed alone (the figures in benchmarks/demo-quality.md
#: were drawn with it)
EXTRA_PROMPTS_SALT = 0x5EED


def chance() -> dict[str, float]:
    """The agreement of a uniform random guess with a prompt drawn uniformly from the grammar."""
    each = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS),
            "size": 1 / len(SIZES)}
    return {**each, "all": math.prod(each.values())}


def extra_prompts(seed: int, count: int) -> list[Spec]:
    """``count`` different prompts drawn uniformly from the grammar with ``seed``, none of them
    one of the fixed `PROMPTS`: they show whether the fixed ones are representative."""
    rng, fixed, drawn = random.Random(mix(seed, EXTRA_PROMPTS_SALT)), {Spec(*p) for p in PROMPTS}, []
    while len(drawn) < count:
        spec = random_spec(rng)
        if spec not in fixed and spec not in drawn:
            drawn.append(spec)
    return drawn


def held_out(seed: int, start: int, count: int) -> tuple[list[Spec], Tensor]:
    """Pictures ``start .. start + count - 1`` of the shapes dataset of ``seed`` (a model trained
    on its first ``start`` never saw them): their specs and images ``[count, 3, 32, 32]``."""
    dataset = ShapesDataset(start + count, seed)
    indices = range(start, start + count)
    return [dataset.spec(i) for i in indices], torch.stack([dataset[i].image for i in indices])


@torch.no_grad()
def hard_reconstructions(vae: Any, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``vae``'s pictures decoded from its hard codes (``decode(get_codebook_indices(x))``) of
    ``images [N, C, H, W]`` in [0, 1]: reconstructions ``[N, C, H, W]`` in [0, 1] and how often
    each code was used, ``[num_tokens]``."""
    codes = torch.cat([vae.get_codebook_indices(chunk) for chunk in images.split(batch_size)])  # [N, f*f]
    pictures = torch.cat([vae.decode(chunk) for chunk in codes.split(batch_size)]).clamp(0, 1)
    return pictures, torch.bincount(codes.flatten().cpu(), minlength=vae.num_tokens)


def agreement(specs: list[Spec], images: Tensor) -> dict[str, float]:
    """The checker's agreement (`score`) with ``specs`` on ``images [N, 3, S, S]`` in [0, 1]."""
    return score([(spec, judge(image)) for spec, image in zip(specs, images, strict=True)])


def rounded(agreement: dict[str, float]) -> dict[str, float]:
    """``agreement`` to 3 decimals, as the summary stores it."""
    return {field: round(value, 3) for field, value in agreement.items()}


def _percent(value: float) -> str:
    return f"{value:.1%}" if value < 0.1 else f"{value:.0%}"


def _row(label: str, agreement: dict[str, float], images: int | str) -> str:
    return f"| {label} | " + " | ".join(_percent(agreement[f]) for f in FIELDS) + f" | {images} |"


def report(summary: dict[str, Any]) -> str:
    """``report.md``: the checker's agreement (generated, extra prompts, VAE ceiling, chance),
    seconds and steps per stage, and codebook usage, from the demo's ``summary``."""
    checker, vae = summary["checker"], summary["vae"]
    lines = [
        f"# dalle-train demo, seed {summary['seed']}{' (--quick)' if summary['quick'] else ''}",
        "",
        "The pixel checker reads colour, shape, position and size back from each picture; these are the",
        "fractions of pictures where it agrees with the prompt.",
        "",
        "| pictures | colour | shape | position | size | all four | count |",
        "|---|---|---|---|---|---|---|",
        _row("generated for the fixed prompts", checker["generated"], checker["images"]),
        _row("generated for prompts drawn with the seed", checker["extra"], checker["extra_images"]),
        _row("VAE ceiling: hard-code reconstructions of held-out pictures", checker["vae_ceiling"],
             checker["held_out"]),
        _row("the held-out pictures themselves (the checker's own accuracy)", checker["dataset"],
             checker["held_out"]),
        _row("chance: a uniform guess", checker["chance"], "-"),
        "",
        "Prompts drawn with the seed: " + "; ".join(f'"{p}"' for p in summary["extra_prompts"]) + ".",
        "",
        "| stage | seconds | steps |",
        "|---|---|---|",
        *(f"| {stage} | {seconds:.1f} | {summary['steps'].get(stage, '-')} |"
          for stage, seconds in summary["seconds"].items()),
        "",
        f"VAE codebook: {vae['codes_used']} of {vae['num_tokens']} codes used on the {checker['held_out']} "
        f"held-out pictures ({vae['num_tokens'] - vae['codes_used']} dead); {vae['codes_per_image']} codes "
        "per picture.",
        "",
    ]
    return "\n".join(lines)


def write_report(summary: dict[str, Any], path: Path) -> None:
    """Write `report` of ``summary`` to ``path``."""
    path.write_text(report(summary))
