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
