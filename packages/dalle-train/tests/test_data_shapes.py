"""The built-in shapes dataset: seeded, random-access, captions from the template, and a
pixel checker that reads the dataset's own pictures back at least 95% right."""

from __future__ import annotations

import random

import pytest
import torch

from dalle_train.data.seeding import mix
from dalle_train.data.shapes import (
    BACKGROUND,
    COLOURS,
    POSITIONS,
    PROMPTS,
    SHAPES,
    SIZES,
    ShapesDataset,
    Spec,
    draw_shape,
    judge,
    make_dataset,
    random_spec,
    score,
    shape_mask,
    tally,
)
from dalle_train.imageio import to_tensor


@pytest.mark.parametrize("image_size, count", [(32, 500), (64, 120)])
def test_checker_reads_the_datasets_own_pictures(image_size, count):
    specs, images = make_dataset(count, seed=0, image_size=image_size)
    assert images.shape == (count, 3, image_size, image_size)
    result = score([(spec, judge(image)) for spec, image in zip(specs, images)])
    print(f"checker on {count} pictures of {image_size}x{image_size}: {result}")
    for field in ("colour", "shape", "position", "size"):
        assert result[field] >= 0.95, (field, result)


def test_every_value_appears_and_captions_follow_the_template():
    data = ShapesDataset(500, seed=1)
    specs = [data.spec(i) for i in range(len(data))]
    assert {s.shape for s in specs} == set(SHAPES) and {s.colour for s in specs} == set(COLOURS)
    assert {s.size for s in specs} == set(SIZES) and {s.position for s in specs} == set(POSITIONS)
    sample = data[7]
    assert sample.caption == specs[7].caption() and sample.source == "shapes/1/7"
    assert Spec("small", "red", "circle", "top left").caption() == "a small red circle in the top left"


def test_seeded_random_access_and_epoch_independent():
    a, b = ShapesDataset(50, seed=3), ShapesDataset(1000, seed=3)
    for index in (0, 17, 49):
        assert torch.equal(a[index].image, b[index].image) and a[index].caption == b[index].caption
        assert torch.equal(a.load(index, 0).image, a.load(index, 9).image)
    other = ShapesDataset(50, seed=4)
    assert sum(torch.equal(a[i].image, other[i].image) for i in range(50)) < 5
    assert len({a[i].image.sum().item() for i in range(50)}) == 50  # jitter: no two alike
    with pytest.raises(IndexError):
        a[50]


def test_pictures_are_drawn_once_and_kept_within_a_bound(monkeypatch):
    import dalle_train.data.shapes as shapes

    drawn = []
    monkeypatch.setattr(shapes, "draw_shape", lambda *args: drawn.append(args) or draw_shape(*args))
    monkeypatch.setattr(shapes, "KEPT_BYTES", 2 * 3 * 32 * 32)  # two pictures
    data = ShapesDataset(5, seed=3)
    first = [data[i].image for i in range(3)]
    assert [torch.equal(data.load(i, 2).image, first[i]) for i in range(3)] == [True] * 3
    assert len(drawn) == 4  # pictures 0 and 1 kept, picture 2 drawn again
    for index, image in enumerate(first):  # drawn or kept, the picture the seed draws
        rng = random.Random(mix(3, index))
        assert torch.equal(image, to_tensor(draw_shape(random_spec(rng), rng)))
    data[0].image.fill_(0.5)  # a sample's image is its own: the kept picture stays
    assert torch.equal(data[0].image, first[0]) and len(drawn) == 4


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least 32x32"):
        ShapesDataset(10, image_size=16)
    with pytest.raises(ValueError, match="at least 1 picture"):
        ShapesDataset(0)


def test_checker_on_blank_and_wrong_pictures():
    blank = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32) / 255
    assert judge(blank) is None
    want = Spec("large", "blue", "square", "center")
    seen = [judge(to_tensor(draw_shape(Spec("large", "blue", shape, "center"), random.Random(i))))
            for i, shape in enumerate(SHAPES)]
    assert [s.shape for s in seen] == list(SHAPES) and all(s.colour == "blue" for s in seen)
    n = len(SHAPES)
    assert tally(want, seen + [None]) == f"checker: colour {n}/{n + 1}, shape 1/{n + 1}"
    result = score([(want, s) for s in seen])
    assert result["colour"] == 1 and result["shape"] == 1 / len(SHAPES) and result["all"] == 1 / len(SHAPES)


def test_prompts_use_known_values():
    for size, colour, shape, position in PROMPTS:
        assert size in SIZES and colour in COLOURS and shape in SHAPES and position in POSITIONS


def test_a_shape_mask_is_the_anti_aliased_coverage_of_its_box():
    """A square on (8, 8, 16.5, 16) of a 32-pixel picture, drawn at 4x (Pillow's rectangle
    includes its last row and column there: a quarter pixel) and box-filtered back: whole pixels
    inside, fractions on the right column and the bottom row, exactly 0 elsewhere."""
    expected = torch.zeros(32, 32)
    expected[8:16, 8:16] = 1
    expected[8:16, 16] = torch.tensor(191.0) / 255  # 3 of 4 supersampled columns
    expected[16, 8:16] = torch.tensor(64.0) / 255  # 1 of 4 supersampled rows
    expected[16, 16] = torch.tensor(48.0) / 255
    torch.testing.assert_close(shape_mask("square", (8, 8, 16.5, 16)), expected, rtol=0, atol=0)


def picture(spec: Spec, seed: int = 0) -> torch.Tensor:
    return to_tensor(draw_shape(spec, random.Random(seed)))


def test_the_checker_ignores_pixels_of_other_colours_and_alpha_and_clamps_its_input():
    blue = Spec("small", "blue", "square", "top left")
    image = picture(blue)
    assert judge(image) == blue
    stray = image.clone()
    stray[:, 26:30, 26:30] = (torch.tensor(COLOURS["green"], dtype=torch.float32) / 255)[:, None, None]
    assert judge(stray) == blue  # a few green pixels are not part of the blue square
    assert judge(torch.cat((image, torch.ones(1, 32, 32)))) == blue  # RGBA: the alpha is not a colour
    overshoot = image.clone()
    overshoot[image > 0.85] = 1.5  # the background's brightest channels, past white
    overshoot[image < 0.2] = -1.0  # the square's darkest channels, past black
    assert judge(overshoot) == judge(overshoot.clamp(0, 1))


@pytest.mark.parametrize("image_size", [32, 64])
def test_a_picture_needs_four_foreground_pixels_per_base_pixel_to_be_read(image_size):
    """Fewer than 4 pixels of a 32-pixel picture (16 of a 64-pixel one) that stand out from the
    background read as blank."""
    needed = 4 * (image_size // 32) ** 2
    red = (torch.tensor(COLOURS["red"], dtype=torch.float32) / 255)[:, None]
    background = (torch.tensor(BACKGROUND, dtype=torch.float32) / 255).view(3, 1, 1)
    for count in (needed - 1, needed):
        image = background.repeat(1, image_size, image_size)
        image.view(3, -1)[:, :count] = red  # the first pixels of the top row
        assert (judge(image) is None) == (count < needed), count


class Extremes(random.Random):
    """A generator whose every draw is the low (or high) end of the range asked for."""

    def __init__(self, high: bool):
        super().__init__(0)
        self.high = high

    def uniform(self, a, b):
        return b if self.high else a

    def randint(self, a, b):
        return b if self.high else a


@pytest.mark.parametrize("high", [False, True], ids=["low", "high"])
def test_jitter_reaches_its_stated_bounds_and_no_further(high):
    """Position +-1.5, size +-1 (pixels of the 32-pixel base), colour +-12 per channel: a large red
    square in the centre, at the extremes of every draw, is that box filled with that colour."""
    sign = 1 if high else -1
    centre, half = 16 + 1.5 * sign, (15 + sign) / 2
    colour = torch.tensor([215 + 12 * sign, 35 + 12 * sign, 35 + 12 * sign], dtype=torch.float32)
    image = to_tensor(draw_shape(Spec("large", "red", "square", "center"), Extremes(high)))
    mask = shape_mask("square", (centre - half, centre - half, centre + half, centre + half))  # [32, 32]
    background = torch.tensor(BACKGROUND, dtype=torch.float32)
    expected = (background[:, None, None] * (1 - mask) + colour[:, None, None] * mask) / 255
    torch.testing.assert_close(image, expected, rtol=0, atol=1.5 / 255)  # two roundings on the edges
    assert torch.equal((image[:, 16, 16] * 255).round(), colour)  # inside: the colour exactly


@pytest.mark.parametrize("shape, centre", [("triangle", (16.0, 18.7)), ("diamond", (16.0, 16.0))])
def test_triangles_and_diamonds_are_centred_in_their_box(shape, centre):
    """A triangle's apex is over its box's middle (its mass two thirds of the way down), a
    diamond's corners at the middles of its box's sides; within a quarter pixel (Pillow's
    polygons include their last supersampled row and column)."""
    mask = shape_mask(shape, (8, 8, 24, 24))  # [32, 32]
    grid = torch.arange(32, dtype=torch.float32) + 0.5  # pixel centres
    x = float((mask.sum(dim=0) * grid).sum() / mask.sum())
    y = float((mask.sum(dim=1) * grid).sum() / mask.sum())
    assert x == pytest.approx(centre[0], abs=0.25) and y == pytest.approx(centre[1], abs=0.25)


def test_edge_cases_of_the_dataset_and_the_score():
    expected = "unknown shape 'hexagon': expected one of circle, square, triangle, diamond"
    with pytest.raises(ValueError, match=expected):
        shape_mask("hexagon", (8, 8, 24, 24))
    single = ShapesDataset(1, seed=3)
    assert len(single) == 1 and single.epoch == 0 and single[0].source == "shapes/3/0"
    with pytest.raises(IndexError, match="index 1 out of range for 1 shapes"):
        single[1]
    spec = single.spec(0)
    assert score([(spec, spec)]) == {"colour": 1.0, "shape": 1.0, "position": 1.0, "size": 1.0, "all": 1.0}
