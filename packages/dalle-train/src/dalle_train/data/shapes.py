"""The built-in synthetic dataset (``--dataset shapes``) and a checker that reads it back.

Pictures of one coloured shape (circle, square, triangle, diamond; five colours, two sizes,
five positions) on a plain background, with captions such as "a small red circle in the top left".
Everything comes from a seed: no download, the same pictures on every machine. Each picture has
a little jitter in position, size and colour, so no two are identical.

`judge` reads colour, shape, position and size back from the pixels, so generated images can
be scored against their prompt (`score`, `tally`); on the dataset's own pictures it is right
well over 95% of the time (tested).

The geometry is laid out for 32x32 pictures (`BASE`); larger sizes scale it (smaller ones
would blur the shapes past what the checker can tell apart).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from dalle_train.data.sample import Sample
from dalle_train.data.seeding import mix
from dalle_train.imageio import to_bytes

BASE = 32  # the side, in pixels, the sizes and positions below are given for
BACKGROUND = (236, 234, 228)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 190, 20),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, float] = {"small": 9.0, "large": 15.0}  # side of the bounding box, pixels of BASE
POSITIONS: dict[str, tuple[float, float]] = {  # centre (x, y), pixels of BASE
    "top left": (9.0, 9.0),
    "top right": (23.0, 9.0),
    "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0),
    "center": (16.0, 16.0),
}
SUPERSAMPLE = 4  # shapes are drawn at 4x and downscaled: anti-aliased edges
#: a dataset keeps the pictures it drew, as bytes, up to this many (64 MiB: 21,845 of 32x32), so
#: that a picture is drawn once and not once per epoch
KEPT_BYTES = 64 * 2**20

#: fixed prompts for sample grids (size, colour, shape, position), so runs compare
PROMPTS: list[tuple[str, str, str, str]] = [
    ("small", "red", "circle", "top left"),
    ("large", "blue", "square", "center"),
    ("large", "yellow", "triangle", "bottom right"),
    ("small", "green", "square", "top right"),
    ("large", "purple", "circle", "bottom left"),
    ("large", "red", "triangle", "center"),
]


@dataclass(frozen=True)
class Spec:
    """What a picture shows."""

    size: str
    colour: str
    shape: str
    position: str

    def caption(self) -> str:
        """The caption template: "a small red circle in the top left"."""
        return f"a {self.size} {self.colour} {self.shape} in the {self.position}"


def random_spec(rng: random.Random) -> Spec:
    """A size, colour, shape and position drawn uniformly."""
    return Spec(
        rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS)),
    )


def _fill(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Draw ``shape`` filling ``box`` (left, top, right, bottom); a triangle points up, a
    diamond is a square standing on a corner."""
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "diamond":
        x, y = (left + right) / 2, (top + bottom) / 2
        draw.polygon([(x, top), (right, y), (x, bottom), (left, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")


def draw_shape(spec: Spec, rng: random.Random, image_size: int = BASE) -> Image.Image:
    """An ``image_size`` square RGB picture of ``spec`` on the background, with jitter drawn
    from ``rng`` (position +-1.5, size +-1 pixels of `BASE`, colour +-12 per channel)."""
    scale = image_size / BASE
    s = SUPERSAMPLE
    image = Image.new("RGB", (image_size * s, image_size * s), BACKGROUND)
    cx, cy = POSITIONS[spec.position]
    cx, cy = cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5)
    half = (SIZES[spec.size] + rng.uniform(-1.0, 1.0)) / 2
    colour = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in COLOURS[spec.colour])
    box = tuple(v * scale * s for v in (cx - half, cy - half, cx + half, cy + half))
    _fill(ImageDraw.Draw(image), spec.shape, box, colour)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


class ShapesDataset(Dataset):
    """``count`` seeded pictures of shapes with their captions, as `Sample` s.

    Item ``index`` depends only on (``seed``, ``index``), not on the epoch or on other items:
    the dataset is random-access and the same on every machine. ``source`` reads
    ``shapes/<seed>/<index>``; `spec` gives what a picture shows. Pictures drawn are kept (up
    to `KEPT_BYTES`) for the next epochs.
    """

    def __init__(self, count: int, seed: int = 0, image_size: int = BASE) -> None:
        if count < 1:
            raise ValueError(f"a shapes dataset needs at least 1 picture, not {count}")
        if image_size < BASE:
            raise ValueError(f"shapes pictures need at least {BASE}x{BASE} pixels, not {image_size}")
        self.count = count
        self.seed = seed
        self.image_size = image_size
        self.epoch = 0
        self._kept: dict[int, torch.Tensor] = {}  # index -> uint8 [3, S, S]

    def __len__(self) -> int:
        return self.count

    def _rng(self, index: int) -> random.Random:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} shapes")
        return random.Random(mix(self.seed, index))

    def spec(self, index: int) -> Spec:
        """What picture ``index`` shows."""
        return random_spec(self._rng(index))

    def set_epoch(self, epoch: int) -> None:
        """Kept for the common dataset interface; the pictures do not change with the epoch."""
        self.epoch = epoch

    def load(self, index: int, epoch: int) -> Sample:
        """Picture ``index`` (the same in every epoch): image ``[3, S, S]`` in [0, 1]."""
        rng = self._rng(index)
        spec = random_spec(rng)
        pixels = self._kept.get(index)
        if pixels is None:
            pixels = to_bytes(draw_shape(spec, rng, self.image_size))  # uint8 [3, S, S]
            if (len(self._kept) + 1) * pixels.numel() <= KEPT_BYTES:
                self._kept[index] = pixels
        return Sample(pixels.float() / 255, spec.caption(), f"shapes/{self.seed}/{index}")

    def __getitem__(self, index: int) -> Sample:
        return self.load(index, self.epoch)


def make_dataset(count: int, seed: int = 0, image_size: int = BASE) -> tuple[list[Spec], torch.Tensor]:
    """The first ``count`` pictures of ``ShapesDataset(count, seed, image_size)`` at once:
    their specs and images ``[count, 3, S, S]`` in [0, 1]."""
    dataset = ShapesDataset(count, seed, image_size)
    specs = [dataset.spec(i) for i in range(count)]
    return specs, torch.stack([dataset[i].image for i in range(count)])


# ------------------------------------------------------------------------------------- checker


def shape_mask(shape: str, box: tuple[float, float, float, float], image_size: int = BASE) -> torch.Tensor:
    """Coverage ``[S, S]`` in [0, 1] of ``shape`` drawn (anti-aliased) to fill ``box``, given
    in pixels of the ``image_size`` picture."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (image_size * s, image_size * s), 0)
    _fill(ImageDraw.Draw(canvas), shape, tuple(v * s for v in box), 255)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    data = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)  # [S*S]
    return data.view(image_size, image_size).float() / 255


def judge(image: torch.Tensor) -> Spec | None:
    """Read back what a picture ``[3, S, S]`` in [0, 1] shows from its pixels; None if blank.

    Colour: the palette colour nearest to most non-background pixels. Coverage: how far each
    pixel lies from the background towards that colour (1 inside the shape, fractions on its
    anti-aliased edge, 0 for pixels of other colours). Shape: the one of `SHAPES`
    filling the coverage's bounding box that differs least from it. Position: the nearest of
    the five centres to the coverage's centre of mass. Size: the nearer bounding box side.
    """
    size = image.shape[-1]
    scale = size / BASE
    background = torch.tensor(BACKGROUND, dtype=torch.float32)  # [3]
    pixels = image[:3].float().clamp(0, 1).permute(1, 2, 0).reshape(-1, 3) * 255  # [HW, 3]
    offset = pixels - background  # [HW, 3]
    foreground = offset.norm(dim=1) > 60  # [HW]
    if int(foreground.sum()) < 4 * scale * scale:
        return None
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [K, 3]
    nearest = torch.cdist(pixels, palette).argmin(dim=1)  # [HW]
    index = int(torch.bincount(nearest[foreground], minlength=len(palette)).argmax())
    colour = list(COLOURS)[index]

    direction = palette[index] - background  # [3]
    alpha = offset @ direction / direction.dot(direction)  # [HW], 0 = background, 1 = colour
    off_line = (offset - alpha[:, None] * direction).norm(dim=1) > 50  # another colour
    coverage = alpha.clamp(0, 1).masked_fill(off_line, 0).view(size, size)  # [S, S]
    ys, xs = (coverage > 0.5).nonzero(as_tuple=True)
    if len(xs) == 0:
        return None
    # bounding box in pixels: partially covered border pixels widen it by their coverage
    rows, cols = coverage.amax(dim=1), coverage.amax(dim=0)  # [S], [S]
    top, bottom = int(ys.min()), int(ys.max())
    left, right = int(xs.min()), int(xs.max())
    box = (
        left - float(cols[left - 1]) if left > 0 else left,
        top - float(rows[top - 1]) if top > 0 else top,
        right + 1 + (float(cols[right + 1]) if right + 1 < size else 0.0),
        bottom + 1 + (float(rows[bottom + 1]) if bottom + 1 < size else 0.0),
    )
    shape = min(SHAPES, key=lambda name: float((shape_mask(name, box, size) - coverage).abs().sum()))
    grid = torch.arange(size, dtype=torch.float32) + 0.5  # [S] pixel centres
    mass = coverage.sum()
    cx = float((coverage.sum(dim=0) * grid).sum() / mass) / scale
    cy = float((coverage.sum(dim=1) * grid).sum() / mass) / scale
    position = min(POSITIONS, key=lambda p: math.dist(POSITIONS[p], (cx, cy)))
    side = (box[2] - box[0] + box[3] - box[1]) / 2 / scale
    size_name = min(SIZES, key=lambda name: abs(SIZES[name] - side))
    return Spec(size_name, colour, shape, position)


def tally(want: Spec, seen: list[Spec | None]) -> str:
    """"checker: colour 7/8, shape 5/8": how many readings agree with the prompt."""
    colour = sum(s is not None and s.colour == want.colour for s in seen)
    shape = sum(s is not None and s.shape == want.shape for s in seen)
    return f"checker: colour {colour}/{len(seen)}, shape {shape}/{len(seen)}"


def score(pairs: list[tuple[Spec, Spec | None]]) -> dict[str, float]:
    """Fraction of (asked, seen) pairs that agree on colour, shape, position, size, and all four."""
    n = max(len(pairs), 1)
    ok = {
        field: sum(seen is not None and getattr(seen, field) == getattr(want, field)
                   for want, seen in pairs) / n
        for field in ("colour", "shape", "position", "size")
    }
    ok["all"] = sum(seen == want for want, seen in pairs) / n
    return ok
