"""Reading images in every mode, corrupt files, and the random resized crop against torch's
antialiased bilinear resize as the plain reference."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle_train.data.images import CorruptImageError, crop_box, load_image, random_resized_crop
from dalle_train.imageio import to_pil, to_tensor


def png_bytes(image: Image.Image, format: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **kwargs)
    return buffer.getvalue()


def write(path, image: Image.Image, format: str = "PNG", **kwargs):
    path.write_bytes(png_bytes(image, format, **kwargs))
    return path


def pixels(image: Image.Image) -> list:
    """Every pixel, row by row."""
    return [image.getpixel((x, y)) for y in range(image.height) for x in range(image.width)]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB picture (every pixel different, so crops and resizes show)."""
    return to_pil(torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)))


# ------------------------------------------------------------------------------------- modes


def test_rgb_png_and_formats_round_trip(tmp_path):
    image = noise(7, 5)
    for fmt, ext in [("PNG", "png"), ("BMP", "bmp"), ("WEBP", "webp")]:
        options = {"lossless": True} if fmt == "WEBP" else {}
        loaded = load_image(write(tmp_path / f"x.{ext}", image, fmt, **options), 3)
        assert loaded.mode == "RGB" and loaded.size == (7, 5)
        assert torch.equal(to_tensor(loaded), to_tensor(image)), fmt
    jpeg = load_image(write(tmp_path / "x.JPG", image, "JPEG", quality=95), 4)
    assert jpeg.mode == "RGBA" and to_tensor(jpeg)[3].eq(1).all()  # opaque alpha added


def test_rgba_keeps_alpha_with_four_channels_and_lies_on_white_with_three(tmp_path):
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (200, 10, 20, 0))  # fully transparent, with a colour underneath
    image.putpixel((1, 0), (30, 40, 50, 255))
    path = write(tmp_path / "a.png", image)
    rgba = load_image(path, 4)
    assert rgba.mode == "RGBA" and pixels(rgba) == [(200, 10, 20, 0), (30, 40, 50, 255)]
    rgb = load_image(path, 3)
    assert rgb.mode == "RGB" and pixels(rgb) == [(255, 255, 255), (30, 40, 50)]


def test_palette_with_and_without_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    assert pixels(load_image(write(tmp_path / "p.png", image), 3)) == [(255, 0, 0), (0, 0, 255)]
    transparent = write(tmp_path / "t.png", image, transparency=0)
    assert pixels(load_image(transparent, 4)) == [(255, 0, 0, 0), (0, 0, 255, 255)]
    assert pixels(load_image(transparent, 3)) == [(255, 255, 255), (0, 0, 255)]


def test_grayscale_la_and_sixteen_bit(tmp_path):
    assert pixels(load_image(write(tmp_path / "l.png", Image.new("L", (1, 1), 77)), 3)) == [(77,) * 3]
    la = Image.new("LA", (1, 1), (90, 0))
    assert pixels(load_image(write(tmp_path / "la.png", la), 4)) == [(90, 90, 90, 0)]
    deep = Image.new("I;16", (1, 1), 40000)  # 16-bit: scaled to 8 bits, not clipped to white
    assert pixels(load_image(write(tmp_path / "i16.png", deep), 3)) == [(155,) * 3]


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    path = write(tmp_path / "phone.jpg", noise(8, 4), "JPEG", exif=exif)
    assert load_image(path, 3).size == (4, 8)


def test_channels_must_be_three_or_four(tmp_path):
    with pytest.raises(ValueError, match="channels must be 3"):
        load_image(write(tmp_path / "a.png", noise(2, 2)), 1)


# ------------------------------------------------------------------------------------- corrupt


@pytest.mark.parametrize("name, damage", [
    ("truncated.png", lambda data: data[: len(data) // 2]),
    ("truncated.jpg", lambda data: data[: len(data) // 2]),
    ("text.jpg", lambda data: b"this is not an image at all\n" * 10),
    ("empty.png", lambda data: b""),
    ("bad-crc.png", lambda data: data[:40] + bytes([data[40] ^ 0xFF]) + data[41:]),
])
def test_corrupt_files_raise_their_own_error(tmp_path, name, damage):
    fmt = "JPEG" if name.endswith(".jpg") else "PNG"
    path = tmp_path / name
    path.write_bytes(damage(png_bytes(noise(40, 40), fmt)))
    with pytest.raises(CorruptImageError) as caught:
        load_image(path, 3)
    assert caught.value.path == str(path) and str(path) in str(caught.value) and caught.value.reason


def test_missing_file_is_reported_as_unreadable(tmp_path):
    with pytest.raises(CorruptImageError, match="cannot be read"):
        load_image(tmp_path / "gone.png", 3)


# ------------------------------------------------------------------------------------- crop


@pytest.mark.parametrize("width, height", [(100, 100), (120, 80), (50, 90)])
def test_crop_box_is_a_square_inside_with_area_in_range(width, height):
    lower = 0.4
    generator = torch.Generator().manual_seed(1)
    fractions = []
    for _ in range(300):
        left, top, side = crop_box(width, height, lower, generator)
        assert 0 <= left and left + side <= width and 0 <= top and top + side <= height
        fractions.append(side * side / (width * height))
    small, large = min(fractions), max(fractions)
    side_slack = 2 / min(width, height)  # rounding the side to whole pixels
    assert small >= lower - side_slack and large <= 1
    assert small < lower + 0.1  # the whole range is used, not one size
    if width == height:
        assert large > 0.9


def test_crop_box_falls_back_to_the_centred_square_and_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    assert crop_box(100, 50, 1.0, generator) == (25, 0, 50)  # a full-area square cannot fit
    assert crop_box(30, 30, 1.0, generator) == (0, 0, 30)
    draws = [[crop_box(64, 48, 0.5, torch.Generator().manual_seed(s)) for s in range(20)] for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) > 10
    with pytest.raises(ValueError, match="lower_ratio"):
        crop_box(10, 10, 0.0, generator)


@pytest.mark.parametrize("width, height, size, lower", [
    (97, 83, 32, 0.6), (20, 30, 32, 0.75), (64, 64, 32, 1.0),
])
def test_random_resized_crop_matches_torch_antialiased_bilinear(width, height, size, lower):
    image = noise(width, height, seed=width)
    out = random_resized_crop(image, size, lower, torch.Generator().manual_seed(7))
    left, top, side = crop_box(width, height, lower, torch.Generator().manual_seed(7))
    crop = to_tensor(image)[:, top:top + side, left:left + side]  # [3, side, side]
    reference = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True)[0]
    assert out.size == (size, size) and out.mode == "RGB"
    # Pillow and torch agree to rounding: at most one level of 255
    assert (to_tensor(out) - reference).abs().max() <= 1.01 / 255


def test_rgba_resize_does_not_bleed_the_colour_of_transparent_pixels():
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # transparent red
    image.paste((0, 0, 255, 255), (32, 0, 64, 64))  # opaque blue right half
    out = to_tensor(random_resized_crop(image, 16, 1.0, torch.Generator().manual_seed(0)))  # [4, 16, 16]
    visible = out[3] > 0
    assert visible.any() and out[0][visible].max() < 1 / 255
