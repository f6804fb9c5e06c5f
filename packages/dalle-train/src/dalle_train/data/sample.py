"""What every dataset of this package yields, one item at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sample:
    """One training example.

    ``image``: float ``[C, H, W]`` in [0, 1] (C = 3, or 4 with transparency);
    ``caption``: the text ("" for image-only datasets);
    ``source``: where it came from (the image file's path, or ``shapes/<seed>/<index>``), so
    errors about a sample (a caption too long, say) can name it.
    """

    image: torch.Tensor
    caption: str
    source: str
