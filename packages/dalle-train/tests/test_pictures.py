"""PNG helpers: grids against a plain per-pixel reference, labelled rows, loss plots, slugs."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from dalle_train.imageio import to_tensor
from dalle_train.pictures import image_grid, image_rows, loss_plot, save_png, slug


def reference_grid(images: torch.Tensor, nrow: int, padding: int, scale: int, pad_value: float):
    """Pixel by pixel: which image (if any) covers grid pixel (y, x)."""
    count, channels, height, width = images.shape
    h, w = height * scale, width * scale
    cols = min(nrow, count)
    rows = math.ceil(count / cols)
    out = torch.full((channels, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for y in range(out.shape[1]):
        for x in range(out.shape[2]):
            r, ry = divmod(y - padding, h + padding)
            c, cx = divmod(x - padding, w + padding)
            index = r * cols + c
            if y >= padding and x >= padding and ry < h and cx < w and c < cols and index < count:
                out[:, y, x] = images[index, :, ry // scale, cx // scale]
    return out


@pytest.mark.parametrize(
    ("count", "nrow", "padding", "scale", "channels"),
    [(5, 3, 2, 1, 3), (4, 8, 0, 2, 3), (7, 2, 1, 3, 4), (1, 1, 0, 1, 3), (3, 2, 3, 2, 1)],
)
def test_image_grid_matches_a_per_pixel_reference(count, nrow, padding, scale, channels):
    generator = torch.Generator().manual_seed(count * 10 + nrow)
    images = torch.rand(count, channels, 5, 6, generator=generator).mul(255).round().div(255)
    grid = image_grid(images, nrow=nrow, padding=padding, scale=scale, pad_value=1.0)
    expected = reference_grid(images.expand(-1, max(channels, 3), -1, -1) if channels == 1 else images,
                              nrow, padding, scale, 1.0)
    assert grid.mode == ("RGBA" if channels == 4 else "RGB")
    assert torch.equal(to_tensor(grid), expected)  # exact: values are multiples of 1/255


def test_image_grid_takes_a_list_and_rejects_bad_shapes():
    images = [torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]
    assert image_grid(images, nrow=2, padding=1).size == (11, 6)
    with pytest.raises(ValueError, match="C = 1, 3 or 4"):
        image_grid(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="no images"):
        image_grid(torch.zeros(0, 3, 4, 4))
    with pytest.raises(ValueError, match="scale >= 1"):
        image_grid(torch.zeros(1, 3, 4, 4), scale=0)


def test_save_png_round_trips_and_replaces_atomically(tmp_path):
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "deep" / "er" / "a.png"
    save_png(image_grid(images, nrow=1, padding=0), path)
    save_png(image_grid(images.flip(-1), nrow=1, padding=0), path)  # over the old file
    with Image.open(path) as reread:
        assert reread.format == "PNG"
        got = to_tensor(reread.convert("RGB"))
    assert torch.allclose(got, images[0].flip(-1), atol=0.5 / 255)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]  # no temporary files left


def test_image_rows_draws_labels_images_and_texts_under_them():
    red = torch.zeros(3, 4, 4)
    red[0] = 1
    rows = [
        ("first row", [red, red, red], [("0.9", (0, 128, 0))] * 3),
        ("second row", torch.stack([red, red]), None),
    ]
    canvas = image_rows(rows, scale=5, title="a title")
    assert canvas.mode == "RGB"
    pixels = to_tensor(canvas)
    is_red = (pixels[0] > 0.99) & (pixels[1] < 0.01) & (pixels[2] < 0.01)  # [H, W]
    assert int(is_red.sum()) == 5 * 20 * 20  # five 20 x 20 upscaled red squares, intact
    is_text = (pixels < 0.6).all(dim=0) & ~is_red  # dark grey/black: title and labels
    assert int(is_text.sum()) > 50
    is_green = (pixels[1] > 0.3) & (pixels[0] < 0.2)  # the texts under the first row
    assert int(is_green.sum()) > 5
    without = image_rows([("only", [red], None)], scale=5)
    assert without.height < canvas.height and without.width < canvas.width
    title = "a title much wider than the one small image under it"
    wide = to_tensor(image_rows([("only", [red], None)], scale=5, title=title))
    inked = (wide < 0.6).all(dim=0).any(dim=0).nonzero()  # [columns with text, 1]
    assert wide.shape[2] > 100 and int(inked.max()) < wide.shape[2] - 3  # the whole title fits


def test_image_rows_cells_fit_the_largest_image_and_texts_must_match():
    rows = [("small", [torch.zeros(3, 4, 4)], None), ("large", [torch.zeros(1, 8, 16)], None)]
    assert image_rows(rows, scale=2).width >= 6 + 32
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        image_rows([("x", [torch.zeros(3, 4, 4)] * 2, [("a", (0, 0, 0))])])


def test_loss_plot_writes_one_panel_per_curve(tmp_path):
    curves = {"VAE": [1.0 / (i + 1) for i in range(100)], "DALLE": [3.0, float("nan"), 2.0, 1.5],
              "flat": [0.5] * 3, "empty": []}
    loss_plot(curves, tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as image:
        assert image.size == (330 * 4, 240)
        pixels = to_tensor(image.convert("RGB"))
    curve = (pixels[2] > 0.5) & (pixels[0] < 0.25)  # the dark blue moving average
    assert int(curve[:, :330].sum()) > 100
    assert int(curve[:, 330:660].sum()) > 20  # NaN step skipped, the rest drawn
    with pytest.raises(ValueError, match="no curves"):
        loss_plot({}, tmp_path / "none.png")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("A small red Circle!", "a-small-red-circle"), ("  --x__y--  ", "x-y"), ("追老鼠的猫", ""),
     ("a" * 150, "a" * 100), ("", "")],
)
def test_slug(text, expected):
    assert slug(text) == expected
